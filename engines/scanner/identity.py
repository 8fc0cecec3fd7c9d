"""Synthetic people and places for simulated exports.

Real scanner exports carry a full patient identity; software that reads them must cope with accented names,
birth dates, ages and accession numbers without ever leaking them. A simulator that wrote "ANONYMOUS" would
hide exactly the code paths that handle identifiers, so every case gets a realistic but invented identity,
drawn from its seed alone so that one seed is always one person.

None of these names belongs to a real patient; they are assembled from common Central European given and
family names. They are all representable in ISO 8859-1 (DICOM ``ISO_IR 100``), the character set Siemens and
Philips consoles declare, so accented letters appear in the files exactly as they do in the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

from engines.phantom.subject import SubjectParameters

#: The date at which a subject's ``age_years`` holds exactly. Birth dates are fixed per seed (a person does
#: not get a new birthday each time a case is exported); PatientAge on a later study date follows from the
#: birth date.
IDENTITY_REFERENCE_DATE = date(2026, 1, 1)

#: Mean length of a year in days, for turning ``age_years`` into a birth date.
DAYS_PER_YEAR = 365.2425

#: DICOM character set every name below fits into (ISO 8859-1).
SPECIFIC_CHARACTER_SET = "ISO_IR 100"

_FEMALE_GIVEN = (
    "Ilona", "Éva", "Katalin", "Zsófia", "Anna", "Júlia", "Petra", "Mónika", "Andrea", "Krisztina",
    "Sabine", "Claudia", "Ingrid", "Maria", "Elena", "Sofia", "Laura", "Hanna", "Lena", "Márta",
)  # fmt: skip
_MALE_GIVEN = (
    "Gábor", "László", "Péter", "Zoltán", "András", "Tamás", "István", "Jürgen", "Thomas", "Stefan",
    "Markus", "Lukas", "Jan", "Tomás", "Marco", "Dávid", "Michael", "Andreas", "Florian", "Matthias",
)  # fmt: skip
_FAMILY = (
    "Varga", "Nagy", "Kovács", "Tóth", "Szabó", "Horváth", "Kiss", "Molnár", "Németh", "Farkas",
    "Balogh", "Papp", "Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Becker", "Hoffmann", "Schäfer",
    "Novák", "Svoboda", "Dvorák", "Rossi", "Bianchi", "Moreau", "Lefèvre", "García", "Jansen", "Berg",
)  # fmt: skip

#: (institution name, address, department). Invented hospitals; addresses follow the Siemens comma style.
_SITES = (
    ("Szent Lukács Kórház", "Üllöi út 78,Budapest,HU,1082", "Radiológia"),
    ("Klinikum am Rosenberg", "Rosenbergstr. 12,Tübingen,DE,72070", "Radiologie"),
    ("Ospedale San Vitale", "Via Emilia 214,Bologna,IT,40139", "Radiologia"),
    ("Spital Limmattal Süd", "Badenerstrasse 540,Zürich,CH,8048", "Radiologie"),
    ("Krankenhaus der Barmherzigen Brüder", "Seilerstätte 2,Linz,AT,4021", "Radiologie"),
    ("St. Elisabeth Wirbelsäulenzentrum", "Lindenallee 3,Graz,AT,8010", "Bildgebung"),
)


@dataclass(frozen=True, slots=True)
class PatientIdentity:
    """Who the images claim to show. Values are already in DICOM form (PN with ``^``, DA as a date)."""

    patient_name: str
    patient_id: str
    birth_date: date
    sex: str
    size_m: float
    weight_kg: float
    accession_number: str
    referring_physician_name: str

    def age_on(self, study_date: date) -> str:
        """DICOM PatientAge (AS, e.g. ``"045Y"``) at the study date, in completed years."""
        years = study_date.year - self.birth_date.year
        if (study_date.month, study_date.day) < (self.birth_date.month, self.birth_date.day):
            years -= 1
        if years < 0:
            raise ValueError(f"study date {study_date} precedes the birth date")
        return f"{years:03d}Y"


@dataclass(frozen=True, slots=True)
class SiteIdentity:
    """Where the images were made: institution and operator, the same for every series of one study."""

    institution_name: str
    institution_address: str
    department_name: str
    operators_name: str
    performing_physician_name: str


def patient_identity(subject: SubjectParameters) -> PatientIdentity:
    """The invented person behind one seed; sex, age, height and weight come from the subject's anatomy."""
    rng = np.random.default_rng([subject.seed, 0x1D])
    given_names = _FEMALE_GIVEN if subject.sex == "F" else _MALE_GIVEN
    given = given_names[int(rng.integers(len(given_names)))]
    family = _FAMILY[int(rng.integers(len(_FAMILY)))]
    # Spread birthdays over the year: the fractional age is kept, the day within it is drawn.
    age_days = subject.age_years * DAYS_PER_YEAR + float(rng.uniform(-0.05, 0.05)) * DAYS_PER_YEAR
    birth_date = IDENTITY_REFERENCE_DATE - timedelta(days=math.floor(age_days))
    referring_given = _MALE_GIVEN + _FEMALE_GIVEN
    referring = (
        f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{referring_given[int(rng.integers(len(referring_given)))]}"
        "^^Dr."
    )
    return PatientIdentity(
        patient_name=f"{family}^{given}",
        patient_id=f"SCT{int(rng.integers(10**7)):07d}",
        birth_date=birth_date,
        sex=subject.sex,
        size_m=subject.height_m,
        weight_kg=subject.weight_kg,
        accession_number=f"RA{int(rng.integers(10**8)):08d}",
        referring_physician_name=referring,
    )


def site_identity(seed: int) -> SiteIdentity:
    """The hospital a seed's study was made at."""
    rng = np.random.default_rng([seed, 0x517E])
    name, address, department = _SITES[int(rng.integers(len(_SITES)))]
    staff_given = _FEMALE_GIVEN + _MALE_GIVEN
    operator = (
        f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{staff_given[int(rng.integers(len(staff_given)))]}"
    )
    physician = (
        f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{staff_given[int(rng.integers(len(staff_given)))]}"
    )
    return SiteIdentity(
        institution_name=name,
        institution_address=address,
        department_name=department,
        operators_name=operator,
        performing_physician_name=physician,
    )


def station_serial(seed: int, vendor: str) -> str:
    """A five-digit device serial number, stable for one seed and vendor (StationName is derived from it)."""
    rng = np.random.default_rng([seed, sum(vendor.encode("ascii"))])
    return f"{int(rng.integers(10_000, 100_000))}"
