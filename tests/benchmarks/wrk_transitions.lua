-- wrk script for bench_api.py: one step-down (POST /v1/patients/{key}/transitions) per
-- patient, each patient once, spread over wrk's threads; every answer but 201 is counted.
--
--   wrk -t THREADS -c CONNECTIONS -d SECONDS -s wrk_transitions.lua URL -- KEYS_FILE TOKEN THREADS
--
-- KEYS_FILE holds one patient key per line. Thread i takes lines i, i + THREADS, ... A thread
-- that runs out of keys stops (and says so in the summary: the run was too long for the keys).
-- done() prints one line, "WRK {json}", that bench_api.py reads.

local threads = {}
local started = 0

function setup(thread)
  thread:set("index", started)
  table.insert(threads, thread)
  started = started + 1
end

function init(args)
  local keys_file, token, count = args[1], args[2], tonumber(args[3])
  mine = {}
  local line_no = 0
  for line in io.lines(keys_file) do
    if line_no % count == index then
      table.insert(mine, line)
    end
    line_no = line_no + 1
  end
  next_key = 1
  created, other, exhausted, first_other = 0, 0, 0, ""
  post_headers = { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" }
  post_body = '{"to_level":"2.1"}'
end

function request()
  if next_key > #mine then
    exhausted = 1
    wrk.thread:stop()
    return wrk.format("GET", "/health/live")
  end
  local key = mine[next_key]
  next_key = next_key + 1
  return wrk.format("POST", "/v1/patients/" .. key .. "/transitions", post_headers, post_body)
end

function response(status, headers, body)
  if status == 201 then
    created = created + 1
  elseif exhausted == 0 then
    other = other + 1
    if first_other == "" then
      local text = string.gsub(string.sub(body or "", 1, 160), '[%c"\\]', " ")
      first_other = status .. " " .. text
    end
  end
end

function done(summary, latency, requests)
  local total_created, total_other, total_exhausted, example = 0, 0, 0, ""
  for _, thread in ipairs(threads) do
    total_created = total_created + thread:get("created")
    total_other = total_other + thread:get("other")
    total_exhausted = total_exhausted + thread:get("exhausted")
    if example == "" then
      example = thread:get("first_other")
    end
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK {"created": %d, "other": %d, "example": "%s", "exhausted_threads": %d, '
      .. '"duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
      .. '"socket_errors": %d, "timeouts": %d}\n',
    total_created, total_other, example, total_exhausted, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    errors.connect + errors.read + errors.write, errors.timeout
  ))
end
