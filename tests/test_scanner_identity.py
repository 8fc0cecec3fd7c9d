"""Synthetic patient identity and site: deterministic per seed, realistic in form, encodable as declared."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import date

from engines.phantom.subject import SubjectParameters
from engines.scanner import identity
from engines.scanner.identity import IDENTITY_REFERENCE_DATE, patient_identity, site_identity


def test_identity_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    subject = SubjectParameters.from_seed(11)
    assert patient_identity(subject) == patient_identity(SubjectParameters.from_seed(11))
    assert site_identity(11) == site_identity(11)
    ids = {patient_identity(SubjectParameters.from_seed(seed)).patient_id for seed in range(20)}
    assert len(ids) == 20


def test_identity_has_dicom_forms_and_matches_the_subject() -> None:
    for seed in range(10):
        subject = SubjectParameters.from_seed(seed)
        person = patient_identity(subject)
        assert re.fullmatch(r"SCT\d{7}", person.patient_id)
        assert re.fullmatch(r"[^\^]+\^[^\^]+", person.patient_name)
        assert re.fullmatch(r"RA\d{8}", person.accession_number)
        assert person.referring_physician_name.endswith("^^Dr.")
        assert person.sex == subject.sex
        assert (person.size_m, person.weight_kg) == (subject.height_m, subject.weight_kg)
        age = int(person.age_on(IDENTITY_REFERENCE_DATE)[:3])
        assert abs(age - subject.age_years) <= 1.0
        assert re.fullmatch(r"\d{3}Y", person.age_on(date(2026, 11, 21)))


def test_age_counts_completed_years() -> None:
    person = replace(patient_identity(SubjectParameters.from_seed(3)), birth_date=date(1980, 6, 15))
    assert person.age_on(date(2020, 6, 14)) == "039Y"
    assert person.age_on(date(2020, 6, 15)) == "040Y"
    assert person.age_on(date(1980, 6, 15)) == "000Y"


def test_every_name_and_place_fits_iso_8859_1() -> None:
    """The files declare ISO_IR 100; a character outside Latin-1 would be replaced silently on write."""
    texts = [*identity._FEMALE_GIVEN, *identity._MALE_GIVEN, *identity._FAMILY]
    texts += [part for site in identity._SITES for part in site]
    for text in texts:
        text.encode("latin-1")
