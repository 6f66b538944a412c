"""The model's own account of L3 (models/l3.py): bounds a prefetch's hit length must lie within."""

from __future__ import annotations

from models.l3 import L3Model

A, AB, ABC = (1, 1), (1, 1, 2, 2), (1, 1, 2, 2, 3, 3)


def test_unfaulted_writes_are_sure_and_bounds_meet():
    m = L3Model(capacity=None)
    m.write([A, AB])
    assert m.bounds([A, AB, ABC]) == (2, 2)


def test_a_hole_stops_both_bounds():
    m = L3Model(capacity=None)
    m.write([A, AB, ABC])
    m.lost(AB)
    assert m.bounds([A, AB, ABC]) == (1, 1)


def test_a_write_fault_makes_later_writes_maybe_and_spoils_a_rewrite():
    m = L3Model(capacity=None)
    m.write([A])
    m.put_faults = True
    m.write([A, AB])  # the rewrite of A may fail, and a failed write drops the old record
    assert m.bounds([A, AB]) == (0, 2)


def test_a_write_in_flight_keeps_an_old_record_sure():
    m = L3Model(capacity=None)
    m.write([A])
    m.write([A, AB], landed=False)
    assert m.bounds([A, AB]) == (1, 2)


def test_a_write_fault_armed_under_a_write_in_flight_spoils_its_old_record():
    """Found by the campaign as a false alarm: a store started on a sure page, then a write fault
    was armed; the store's put failed when it ran and dropped the old record."""
    m = L3Model(capacity=None)
    m.write([A])
    m.write([A], landed=False)
    m.faulted_in_flight([A])
    assert m.bounds([A]) == (0, 1)


def test_a_forged_record_is_maybe_until_read_back():
    m = L3Model(capacity=None)
    m.write([A, AB])
    m.forged(A)
    assert m.bounds([A, AB]) == (0, 2)
    m.read_back(A, present=False)  # the driver's read dropped it
    assert m.bounds([A, AB]) == (0, 0)


def test_torn_reads_doubt_what_a_prefetch_reads():
    m = L3Model(capacity=None)
    m.write([A, AB])
    m.get_tears = True
    m.read([AB])
    assert m.bounds([A, AB]) == (1, 2)


def test_lru_bound_counts_every_page_touched_since_the_last_certain_write():
    m = L3Model(capacity=2)
    m.write([A])
    m.tick()
    m.write([AB])
    assert m.bounds([A]) == (1, 1)  # one other page touched since: safe with room for two
    m.tick()
    m.tick([ABC])  # a read in flight touches ABC: two others since A's write
    assert m.bounds([A]) == (0, 1)  # A may be the LRU victim of the next write
    assert m.bounds([AB]) == (1, 1)


def test_a_restart_forgets_the_lru_order():
    m = L3Model(capacity=3)
    m.write([A])
    m.tick()
    m.write([AB])
    m.tick()
    m.write([ABC])
    m.tick()
    m.write([(9, 9)])  # A, written first, may be the victim of this write
    assert m.bounds([A])[0] == 0 and m.bounds([AB])[0] == 1
    m.reopened()  # the rebuilt index orders its pages any way: each counts every other as newer
    m.tick()
    assert m.bounds([AB])[0] == 0 and m.bounds([ABC])[0] == 0 and m.bounds([AB])[1] == 1


def test_a_forged_page_a_read_missed_may_come_back_after_a_restart():
    m = L3Model(capacity=None)
    m.forged(A)  # a forged record in A's file, which the index may lack
    m.read_back(A, present=False)  # the driver's read missed: the index lacks A now...
    assert m.bounds([A]) == (0, 0)
    m.reopened()  # ...but the file stays, and the rebuilt index may hold it
    assert m.bounds([A]) == (0, 1)
    m.read_back(A, present=True)  # a read that served A: the record is sound again
    m.reopened()
    assert m.bounds([A]) == (1, 1)


def test_a_write_through_a_replaced_backend_may_come_back_after_the_next_restart():
    """Found by CI's short verify as a false alarm: a store wrote on through the backend a restart
    replaced; its file was not in the new index (a read-back missed it) until the next restart."""
    m = L3Model(capacity=12)
    m.write([A])
    m.stale_writes([AB])
    assert m.bounds([A]) == (0, 1), "the old backend's eviction may delete any file"
    m.read_back(AB, present=False)  # the new index lacks it
    assert m.bounds([A, AB]) == (0, 1)
    m.reopened()
    assert m.bounds([A, AB]) == (0, 2), "the next restart may index the file it left"
    m.write([AB])
    m.read_back(AB, present=False)
    m.reopened()
    assert m.bounds([AB]) == (0, 0), "rewritten through the current backend, then lost: no orphan left"
