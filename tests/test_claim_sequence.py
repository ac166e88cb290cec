"""daemon.claim_sequence: the check, claim, re-check sequence the daemon and `segment --claim`
share, on a real shared output folder with two lease managers (two hosts)."""

from __future__ import annotations

import json

from tomolive.core.fingerprint import input_fingerprint
from tomolive.core.result_folder import summary_path
from tomolive.daemon import claim_sequence
from tomolive.daemon.failure_records import FailureRecords
from tomolive.daemon.leases import LeaseManager, lease_key


def _setup(tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "in" / "TS_01.mrc"
    path.parent.mkdir()
    path.write_bytes(b"\0" * 2048)
    work = claim_sequence.Work(path, out / "TS_01", lease_key("TS_01"), "TS_01")
    return out, work, LeaseManager(out, 30.0, host="a"), FailureRecords(out, max_attempts=1)


def _publish(work):
    work.out_folder.mkdir(parents=True)
    summary = {"input": {"fingerprint": input_fingerprint(work.path)}, "model": {}}
    summary_path(work.out_folder).write_text(json.dumps(summary))


def test_needed_work_is_claimed_and_the_lease_is_ours(tmp_path):
    out, work, leases, failures = _setup(tmp_path)
    claim = claim_sequence.claim(work, leases, failures)
    assert claim.status is None and claim.fingerprint == input_fingerprint(work.path)
    assert leases.holder(work.key)["host"] == "a"


def test_done_quarantined_gone_and_changed_work_is_not_claimed(tmp_path):
    out, work, leases, failures = _setup(tmp_path)
    assert claim_sequence.claim(work, leases, failures,
                                unchanged=lambda: False).status == claim_sequence.CHANGED
    failures.record_failure(work.key, input_fingerprint(work.path), "bad header")
    assert claim_sequence.claim(work, leases, failures).status == claim_sequence.QUARANTINED
    _publish(work)
    assert claim_sequence.claim(work, leases, failures).status == claim_sequence.DONE
    work.path.unlink()
    assert claim_sequence.claim(work, leases, failures).status == claim_sequence.GONE
    assert leases.holder(work.key) is None  # no check left a lease behind


def test_work_leased_by_another_host_is_held(tmp_path):
    out, work, leases, failures = _setup(tmp_path)
    other = LeaseManager(out, 30.0, host="b")
    assert other.try_claim(work.key, work.rel_output) is not None
    claim = claim_sequence.claim(work, leases, failures)
    assert claim.status == claim_sequence.HELD and claim.lease is None
    assert leases.holder(work.key)["host"] == "b"


def test_a_result_published_between_the_check_and_the_claim_releases_the_lease(tmp_path):
    out, work, leases, failures = _setup(tmp_path)

    def published_meanwhile() -> bool:  # runs after the first check, before the claim
        _publish(work)
        return True

    claim = claim_sequence.claim(work, leases, failures, unchanged=published_meanwhile)
    assert claim.status == claim_sequence.DONE and claim.lease is None
    assert leases.holder(work.key) is None
