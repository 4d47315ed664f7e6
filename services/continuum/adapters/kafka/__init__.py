"""Kafka adapters (kafka-python): client construction, the event publisher, the ADT consumer."""
