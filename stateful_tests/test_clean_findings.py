"""Clean-cache disagreements the campaign found, classified and kept: each program replays clean.

Both were found by `refcache verify` on 16 worker processes (the NVIDIA H200 host, 2026-12-02),
about 1.5 M clean steps in, and both were the oracle being wrong, not the cache:

- A sidecar eviction under write-back may free one holder and thereby make its parent a device
  leaf with no L2 copy; the parent's eviction then waits for the backup the step started. The
  amount check counted only holders deferrable *before* the step and called the short eviction a
  bug. It now counts the pages of a backup the step started as deferred.
- A rank that its simulated TP peer pulls into terminating while its own mamba pool transfer is
  in flight gives up its part and drains. The drift guard looked for that step among the
  one-rank relation's terminations, which never terminate with a pool transfer in flight; in
  that relation the step is an abort, and the guard now accepts it as one.

A third came from CI's own short `refcache verify` (2 workers, 40 s, 2026-12-03), the oracle wrong
again: a page whose L3 file was forged after a failed write had dropped it from the index. The
driver's own read missed it (the index lacked it), and the L3 model then forgot that the forged
file was still on disk; a restart indexed it and the prefetch counted it (its read later rejects
the record). The model now keeps a missed forged page as one a restart may index again.

A fourth, from the README's own `refcache verify` (2 workers, 300 s, 2026-12-03), was a real bug in
refcache: under selective write-through, a match that makes a node due for backup makes room in L2
for it by host eviction, and that eviction could take the host-only end of the very path being
matched. The match then returned the deleted node as its last_host_node and best_match_node (the
same shape as a node deleted while the host tier still references it). The match now holds a host
reference on its path while the backup makes room; the model's backup-liveness rule leaves that
path out of the room it counts.

A fifth, again from CI's short `refcache verify` (2026-12-03), was the oracle wrong: a storage
restart came while a store was still writing. The store writes on through the backend it started
with, so its file lands behind the new index's back; the driver's read-back missed it and the L3
model forgot the page, and the next restart indexed the file, so a prefetch found pages the model
said L3 lacked. Two backends on one directory can also delete each other's files, so the model
now trusts no page it was sure of while such a write is in flight, and keeps its pages as ones a
restart may index. (The run did not replay from its seed: a restart orders its index by file
modification time. The machines' file L3 now stamps its files with a logical time.)

Three more came from one default `refcache verify --seed 1` (2 workers, 300 s, 2026-12-03):
- the oracle wrong: storage lost a page while a store of it was still in flight; the model
  forgot the page for good, and the store then wrote it again. A store in flight now keeps its
  pages possible in the model until it ends;
- the oracle wrong, the same shape as the first finding in an allocation: SWA eviction for an
  allocation under write-back freed a child, which made its parent a device leaf without an L2
  copy, whose eviction then waits for the backup the allocation started; the allocation check
  now counts that parent as deferred, as the eviction check does;
- the campaign wrong: a worker hunted a seeded mamba slot leak, and the other geometries' round
  trip it memoized under the patch was then reported on the clean cache. A seeded bug's patch
  now drops that memo on entry and exit (test_seeded_bugs.py keeps this).
"""

from __future__ import annotations

import pytest

from campaign.report import replay

FINDINGS = {
    "swa_write_back_deferred_parent": ("swa/write_back", [
        "requests_0 = state.first_request(tokens=[1, 1, 2, 2, 1, 1])",
        "requests_1 = state.insert_new(tokens=[1, 1])",
        "state.evict_sidecar()",
        "state.finish_part(fail=False, i=0)",
        "state.prefetch(extra=[(2, 2)], tokens=requests_1)",
        "state.poll()",
        "state.prefetch(extra=[], tokens=requests_1)",
        "state.evict_sidecar()",  # frees [1,1,2,2]'s SWA, backs [1,1] up before freeing its own
    ]),
    "mamba_peer_terminates_with_pool_in_flight": ("mamba/write_back", [
        "requests_0 = state.first_request(tokens=[1, 1])",
        "state.evict_sidecar()",
        "state.settle()",
        "state.prefetch(extra=[], tokens=requests_0)",
        "state.peer_view(cap=None, ready=False, terminated=True)",
        "requests_1 = state.seed_storage(extra=[], keep=1, tokens=[2, 2, 1, 1])",
        "requests_2 = state.insert_new(tokens=[1, 1])",
        "state.evict_sidecar()",
        "state.insert(tokens=requests_2)",
        "state.prefetch(extra=[], tokens=requests_1)",
        "state.progress(i=0)",  # the peer stopped: this rank gives up its part, pool transfer in flight
    ]),
    "l3_forged_file_outlives_a_missed_read": ("full/write_back", [
        "requests_1 = state.seed_storage(extra=[], keep=8, tokens=[2, 2, 3, 3])",
        "state.storage_fault(kind='io_error', op='put')",
        "requests_2 = state.seed_storage(extra=[], keep=1, tokens=requests_1)",  # the failed write drops [2, 2]
        "state.reopen_storage()",
        "state.storage_forged_record(k=0, kind='misplaced', r=0)",  # [3, 3]'s record under [2, 2]'s name
        "state.peer_read(cancel=False, i=0)",  # a miss: the index lacks it, the file stays
        "state.reopen_storage()",  # the restart indexes the forged file
        "state.prefetch(extra=[(3, 3)], tail=(), tokens=requests_2)",  # counts it: both pages
    ]),
    "selective_backup_evicts_the_matched_path": ("full/write_through_selective", [
        "requests_0 = state.first_request(tokens=[1, 1])",
        "state.evict(n=2)",
        "requests_1 = state.seed_storage(extra=[(1, 1), (3, 3)], keep=1, tokens=requests_0)",
        "state.prefetch_seeded(extra=[(1, 1)], i=0)",
        "state.prefetch_and_wait(i=0, k=0)",
        "state.prefetch_seeded(extra=[], i=0)",
        "requests_2 = state.insert_new(tokens=[2, 2])",
        "(nodes_0,) = state.match(extra=[], form='list', tail=(1,), tokens=requests_2)",
        "state.backup(node=nodes_0)",
        "requests_3 = state.insert_new(tokens=[1, 1, 1, 1])",
        "state.wait_prefetch(i=1, k=3, n=1)",
        "(nodes_1,) = state.match(extra=[], form='list', tail=(), tokens=requests_3)",
        "state.evict(n=1000000)",
        "state.prefetch_seeded(extra=[], i=0)",
        "state.insert(tokens=requests_3)",
        "state.prefetch_and_wait(i=0, k=0)",  # its match makes [1, 1, 1, 1] due; room came from [.., 3, 3]
    ]),
    "l3_store_lands_across_a_restart": ("full/write_back", [
        "requests_0 = state.first_request(tokens=[2, 2, 3, 3])",
        "(nodes_0,) = state.match(extra=[], form='list', tail=(), tokens=requests_0)",
        "state.backup(node=nodes_0)",
        "state.settle()",
        "state.store(node=nodes_0)",
        "state.reopen_storage()",  # the store writes on through the old backend
        "state.settle()",  # its files land; the new index lacks them, so the read-back misses
        "state.reopen_storage()",  # this restart indexes them
        "state.evict(n=1000000)",
        "state.evict_host(n=1000000)",
        "state.prefetch(extra=[], tokens=requests_0)",  # L3 holds both pages
    ]),
    "l3_hole_under_a_store_in_flight": ("full/write_through", [
        "requests_0 = state.first_request(tokens=[1, 1, 1, 1, 1, 1, 1, 1, 1, 1])",
        "state.finish_op(i=0)",
        "state.poll()",
        "nodes_1 = state.any_node(i=0)",
        "state.store(node=nodes_1)",
        "requests_4 = state.seed_storage(extra=[], keep=1, tokens=[1, 1])",
        "state.storage_hole(k=0, tokens=requests_4)",  # [1, 1] lost while the store still writes it
        "state.kv_first(i=0)",  # the store writes it again
        "state.peer_read(cancel=False, i=0)",  # and a read finds it
    ]),
    "swa_write_back_alloc_defers_a_parent": ("swa/write_back", [
        "requests_0 = state.first_request(tokens=[2, 2, 1, 1, 1, 1])",
        "requests_1 = state.insert_new(tokens=[2, 2])",
        "requests_3 = state.insert_new(tokens=[1, 1, 1, 1, 1, 1, 1, 1, 1, 1])",
        "state.settle()",
        "state.insert(tokens=requests_0)",
        "requests_4 = state.seed_storage(extra=[(1, 1)], keep=8, tokens=requests_3)",
        "state.insert(tokens=requests_4)",  # frees [2, 2, 1, 1, 1, 1]; [2, 2] then waits for its backup
    ]),
}


@pytest.mark.parametrize("name", FINDINGS)
def test_clean_finding_replays_without_disagreement(name):
    machine, rules = FINDINGS[name]
    r = replay(machine, rules)
    assert not r.failed, f"{r.check}: {r.message}"
    assert not r.message, r.message  # every step ran (no precondition or replay problem)
