"""Read models built by folding the event log: census, timelines (and, later, audit trails
and outcome metrics). They depend on the event contract and the domain's fold, never on a
database adapter: runners feed them events from the store or from Kafka."""
