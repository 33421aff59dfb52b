"""Server-made execution ids (spear/core/ids.py): ULIDs that sort by creation time."""

import random

from spear.core import ids
from spear.core.contract import validate_id

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def one_character_at_a_time(value: int) -> str:
    """The ULID text of a 128-bit value, five bits per character (the specification's way)."""
    return "".join(ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))


def test_encode_writes_what_the_ulid_specification_writes():
    rng = random.Random(7)
    values = [0, 1, 1023, 1024, (1 << 128) - 1, 1 << 127, (1 << 80) - 1, 1 << 80]
    values += [rng.getrandbits(rng.choice([8, 48, 80, 128])) for _ in range(20_000)]
    for value in values:
        assert ids.encode(value) == one_character_at_a_time(value), value


def test_new_ids_are_valid_and_sort_in_creation_order():
    made = [ids.new_execution_id() for _ in range(5_000)]  # many share a millisecond: they count up
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    for execution_id in made[:50]:
        assert len(execution_id) == 26 and set(execution_id) <= set(ALPHABET)
        assert validate_id(execution_id, "execution_id") == execution_id
