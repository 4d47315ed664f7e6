"""The console in chromium, end to end: sign in, read the census, find and open a patient, see
a refused step-down explained beside its field, record a reassessment, step the patient down,
find the stale-reassessment flag in the audit trail (and export it as CSV), and see the
version conflict explained. Every page is saved as a screenshot (tests/browser/artifacts/)."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from continuum.domain import commands as c
from tests.browser.conftest import Console, assessment

pytestmark = pytest.mark.slow


def shot(page: Page, console: Console, name: str) -> None:
    page.screenshot(path=str(console.artifacts / f"{name}.png"), full_page=True)


def sign_in(page: Page, console: Console, token: str) -> None:
    page.goto(f"{console.base_url}/console")
    expect(page).to_have_url(re.compile(r"/console/sign-in$"))
    page.get_by_label("Bearer token").fill(token)
    page.get_by_role("button", name="Sign in with this token").click()


def test_case_manager_story(chromium: Any, console: Console) -> None:
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    keys = console.seeded.keys
    try:
        # -- sign in ---------------------------------------------------------------------
        page.goto(f"{console.base_url}/")
        expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
        shot(page, console, "01-sign-in")
        sign_in(page, console, console.token("case_manager", ("site-a",)))

        # -- the census ------------------------------------------------------------------
        expect(page).to_have_url(re.compile(r"/console/census$"))
        expected = console.seeded.census
        expect(page.locator("#census-total")).to_have_text(str(sum(expected.values())))
        table = page.locator("#census-table")
        for (level, site), n in expected.items():
            row = table.locator("tbody tr", has=page.locator(f"th:text-is('{level}')"))
            sites = table.locator("thead th").all_inner_texts()
            cell = row.locator("td").nth(sites.index(site) - 1)
            expect(cell).to_have_text(str(n))
        # Occupancy: site-b has one 3.5 place and one patient there.
        occupancy = page.locator("#occupancy-table tr", has_text="site-b")
        expect(occupancy).to_contain_text("100%")
        # The daily chart: an accessible SVG with bars, and the overdue list.
        chart = page.get_by_role("img", name=re.compile("Daily census"))
        expect(chart).to_be_visible()
        assert chart.locator("rect").count() > 30
        overdue = page.locator("#overdue-table")
        expect(overdue).to_contain_text(keys["main"])
        expect(overdue).not_to_contain_text(keys["other_site"])  # site-b: not this caller's
        expect(overdue).not_to_contain_text(keys["voided"])  # reassessed 3 days ago
        shot(page, console, "02-census")

        # -- the patient list: search by name (a case manager sees identity) -------------
        page.get_by_role("link", name="Patients").click()
        expect(page.locator("#patient-count")).to_contain_text("4 patients")
        page.get_by_label("Search by key or name").fill("avery")
        expect(page.locator("#patient-count")).to_contain_text("1 patient ")
        expect(page.locator("#patients-table")).to_contain_text("Avery Testcase")
        shot(page, console, "03-patients-search")
        page.get_by_label("Search by key or name").fill("")
        page.get_by_label("Level", exact=True).select_option("3.7")
        expect(page.locator("#patient-count")).to_contain_text("1 patient ")
        expect(page.locator("#patients-table")).to_contain_text(keys["voided"])
        page.get_by_label("Level", exact=True).select_option("")
        page.get_by_label("Reassessment", exact=True).select_option("yes")
        expect(page.locator("#patients-table")).to_contain_text(keys["main"])
        expect(page.locator("#patients-table")).not_to_contain_text(keys["voided"])
        shot(page, console, "04-patients-overdue")

        # -- a patient with a voided event: struck through ----------------------------------
        page.goto(f"{console.base_url}/console/patients/{keys['voided']}")
        struck = page.locator("#events-list li.voided del")
        expect(struck).to_have_count(1)
        expect(struck).to_contain_text("reassessed at 3.7")
        expect(page.locator("#assessments-table tr.voided")).to_have_count(1)
        shot(page, console, "05-patient-voided-event")

        # -- open the patient; a step-down on a stale assessment is refused inline ----------
        page.goto(f"{console.base_url}/console/patients")
        page.get_by_role("link", name=keys["main"]).click()
        expect(page.get_by_role("heading", name=f"Patient {keys['main']}")).to_be_visible()
        expect(page.locator("#patient-name")).to_have_text("Avery Testcase")
        expect(page.get_by_role("img", name="Levels of care over time")).to_be_visible()
        shot(page, console, "06-patient")
        move = page.locator("#transition-form")
        move.get_by_label("To level").select_option("2.1")
        move.get_by_role("button", name="Record the move").click()
        error = page.locator("#reassessment_event_id-error")
        expect(error).to_contain_text("needs a reassessment within 7 days")
        expect(error).to_contain_text("reassessment.stale")
        rests_on = page.locator("#reassessment_event_id")
        expect(rests_on).to_have_attribute("aria-invalid", "true")
        expect(rests_on).to_have_attribute("aria-describedby", "reassessment_event_id-error")
        expect(page.locator("#patient-level")).to_have_text("3.5")  # nothing was written
        shot(page, console, "07-refused-inline")

        # -- record a reassessment ------------------------------------------------------------
        form = page.locator("#reassess-form")
        for dimension, rating in zip("123456", "001200", strict=True):
            form.locator(f"#rating_{dimension}").select_option(rating)
        form.get_by_label("Hours per week scheduled").fill("12")
        form.get_by_role("button", name="Record reassessment").click()
        expect(page.get_by_role("status")).to_have_text("Reassessment recorded.")
        latest = page.locator("#assessments-table tbody tr").first
        expect(latest).to_contain_text("reassessment")
        expect(latest.locator("td").nth(6)).to_have_text("2")  # D4
        expect(latest).to_contain_text("2.1")  # indicated
        shot(page, console, "08-reassessed")

        # -- step the patient down --------------------------------------------------------------
        move = page.locator("#transition-form")
        move.get_by_label("To level").select_option("2.1")
        move.get_by_role("button", name="Record the move").click()
        expect(page.get_by_role("status")).to_have_text("Move recorded.")
        expect(page.locator("#patient-level")).to_have_text("2.1")
        row = page.locator("#transitions-table tbody tr").last
        expect(row).to_contain_text("step-down 3.5")
        expect(row).to_contain_text("2.1 / 2.1")
        # 3.5 -> 2.1 passes over 3.3, 3.1 and 2.5: allowed, and flagged for the audit.
        expect(row.locator("td.flags")).to_have_text("skipped levels")
        shot(page, console, "09-stepped-down")

        # -- the audit trail: the stale reassessment flag, filter, CSV -----------------------
        console.caught_up()
        page.get_by_role("link", name="Audit trail").click()
        table = page.locator("#audit-table")
        expect(page.locator("#audit-count")).to_have_text("3 rows")
        mine = table.locator("tr", has_text=keys["main"])
        expect(mine).to_contain_text("step-down 3.5")
        expect(mine.locator("td.flags")).to_have_text("skipped levels")
        stale = table.locator("tr", has_text=keys["legacy"])
        expect(stale.locator("td.flags")).to_contain_text("stale reassessment")
        expect(table.locator("tr", has_text=keys["clean"]).locator("td.flags")).to_have_text("none")
        shot(page, console, "10-audit")
        page.get_by_label("Rows", exact=True).select_option("yes")
        expect(page.locator("#audit-count")).to_have_text("2 rows")
        expect(page.locator("#audit-table")).not_to_contain_text(keys["clean"])
        shot(page, console, "11-audit-flagged")
        with page.expect_download() as download:
            page.get_by_role("link", name="Export these rows as CSV").click()
        text = download.value.path().read_text(encoding="utf-8")
        rows = {r["patient_key"]: r for r in csv.DictReader(io.StringIO(text))}
        assert set(rows) == {keys["legacy"], keys["main"]}
        assert rows[keys["legacy"]]["flag_stale_reassessment"].lower() in ("true", "1")
        assert rows[keys["main"]]["flag_stale_reassessment"].lower() in ("false", "0")
        page.goto(f"{console.base_url}/console/patients/{keys['legacy']}")
        legacy = page.locator("#transitions-table tbody tr").first
        expect(legacy.locator("td.flags")).to_contain_text("stale reassessment")
        expect(legacy).to_contain_text("11.0 days old")
        shot(page, console, "12-legacy-patient-flag")

        # -- someone else changes the patient while the form is open ---------------------------
        page.goto(f"{console.base_url}/console/patients/{keys['main']}")
        console.ctx.app.service.handle(
            c.RecordReassessment(patient_key=keys["main"], assessment=assessment("001100", 10))
        )
        form = page.locator("#reassess-form")
        for dimension in "123456":
            form.locator(f"#rating_{dimension}").select_option("0")
        form.get_by_role("button", name="Record reassessment").click()
        conflict = page.locator("#reassess-conflict")
        expect(conflict).to_contain_text("Someone else changed this patient; reload.")
        shot(page, console, "13-version-conflict")
        conflict.get_by_role("link", name="Reload the patient").click()
        expect(page.locator("#assessments-table tbody tr").first).to_contain_text("clin-7")

        # -- sign out ---------------------------------------------------------------------------
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
        page.goto(f"{console.base_url}/console/census")
        expect(page).to_have_url(re.compile(r"/console/sign-in$"))
    finally:
        context.close()


def test_auditor_sees_no_names_and_no_forms(chromium: Any, console: Console) -> None:
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        # The dev issuer's role picker (this browser is on 127.0.0.1).
        page.goto(f"{console.base_url}/console/sign-in")
        page.get_by_label("Role", exact=True).select_option("auditor")
        page.get_by_role("button", name="Sign in as this role").click()
        expect(page).to_have_url(re.compile(r"/console/census$"))
        page.get_by_role("link", name="Patients").click()
        expect(page.get_by_label("Search by pseudonymous key")).to_be_visible()
        table = page.locator("#patients-table")
        expect(table).to_contain_text(console.seeded.keys["other_site"])  # every site
        expect(table).not_to_contain_text("Avery")
        page.get_by_label("Search by pseudonymous key").fill("avery")
        expect(page.locator("#q-error")).to_contain_text("does not see names")
        shot(page, console, "20-auditor-patients")
        page.goto(f"{console.base_url}/console/patients/{console.seeded.keys['main']}")
        expect(page.locator("#patient-name")).to_have_count(0)
        expect(page.locator("#reassess-form")).to_have_count(0)
        expect(page.locator("#transition-form")).to_have_count(0)
        shot(page, console, "21-auditor-patient")
    finally:
        context.close()
