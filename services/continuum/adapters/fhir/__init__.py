"""FHIR R4 export of one patient's record (built with the R4B models of fhir.resources).

`patient_bundle(key, events, policies)` turns a patient's event stream into a collection
Bundle: Patient (pseudonymous key only), EpisodeOfCare per episode, Encounter per level stay,
Observation per assessment. See docs/fhir.md for the mapping and the code systems.
"""

from continuum.adapters.fhir.export import patient_bundle

__all__ = ["patient_bundle"]
