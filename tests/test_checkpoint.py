"""Weights and checkpoint files: atomic, validated, never unpickled."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from learned_opt import AdamRule, LSTMOptimizer, LSTMRule
from learned_opt.checkpoint import (
    CheckpointError,
    WeightsMismatchError,
    atomic_save,
    load_rule,
    rule_to_dict,
    safe_load,
    save_rule,
)


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_rule_file_round_trip(tmp_path: Path, rule: LSTMRule) -> None:
    save_rule(tmp_path / "w.pt", rule, {"command": "test"})
    loaded, meta = load_rule(tmp_path / "w.pt", expected_kind="lstm")
    assert meta == {"command": "test"}
    for a, b in zip(rule.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "learned_opt.rule/1", "payload": _Payload(marker)}, evil)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Payload(marker), f)
    for path in (evil, tmp_path / "evil.pkl"):
        with pytest.raises(CheckpointError, match="Refused|corrupt"):
            load_rule(path)
        with pytest.raises(CheckpointError):
            LSTMOptimizer([torch.nn.Parameter(torch.ones(1))], weights=path)
    assert not marker.exists()


def test_wrong_architecture_names_expected_and_found(tmp_path: Path) -> None:
    big = LSTMRule(hidden_size=40)
    record = rule_to_dict(big)
    record["config"]["hidden_size"] = 20  # config says 20, tensors are 40 wide
    atomic_save(record, tmp_path / "bad.pt")
    with pytest.raises(WeightsMismatchError, match=r"expected \(20, 80\), found \(40, 160\)"):
        load_rule(tmp_path / "bad.pt")

    save_rule(tmp_path / "adam.pt", AdamRule())
    with pytest.raises(WeightsMismatchError, match="hold a 'adam' rule, not a coordinatewise LSTM"):
        LSTMOptimizer([torch.nn.Parameter(torch.ones(1))], weights=tmp_path / "adam.pt")

    save_rule(tmp_path / "wide.pt", big)
    with pytest.raises(WeightsMismatchError, match="expected an LSTM with hidden_size=20, found"):
        LSTMOptimizer(
            [torch.nn.Parameter(torch.ones(1))], weights=tmp_path / "wide.pt", hidden_size=20
        )


def test_a_huge_size_in_the_config_is_refused_before_anything_is_allocated(
    tmp_path: Path,
) -> None:
    record = rule_to_dict(LSTMRule(hidden_size=20))
    record["config"]["hidden_size"] = 2**20  # the LSTM's weights would need 16 TB
    atomic_save(record, tmp_path / "huge.pt")
    with pytest.raises(WeightsMismatchError, match=r"wrong shapes: .*expected \(1048576, "):
        load_rule(tmp_path / "huge.pt")


def test_truncated_and_garbage_files(tmp_path: Path, rule: LSTMRule) -> None:
    save_rule(tmp_path / "w.pt", rule)
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    for name in ("trunc.pt", "garbage.pt"):
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            safe_load(tmp_path / name)
    with pytest.raises(CheckpointError, match="No such"):
        safe_load(tmp_path / "missing.pt")
    atomic_save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a learned_opt rule file"):
        load_rule(tmp_path / "other.pt")


def test_atomic_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    atomic_save({"x": torch.ones(2)}, tmp_path / "sub" / "a.pt")
    atomic_save({"x": torch.zeros(2)}, tmp_path / "sub" / "a.pt")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.pt"]
    assert torch.equal(safe_load(tmp_path / "sub" / "a.pt")["x"], torch.zeros(2))


def test_bytes_changed_inside_a_tensor_are_caught(tmp_path: Path, rule: LSTMRule) -> None:
    """torch.load does not check the archive's CRCs: without the check, changed tensor bytes
    would load silently (and a resume would not fall back to the previous checkpoint)."""
    save_rule(tmp_path / "w.pt", rule)
    data = bytearray((tmp_path / "w.pt").read_bytes())
    raw = rule.weight_ih_l0.detach().contiguous().numpy().tobytes()
    at = bytes(data).find(raw[:16])
    assert at > 0
    data[at : at + 8] = b"\x7f" * 8
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        load_rule(tmp_path / "bad.pt")


def test_malformed_records_raise_checkpoint_errors(tmp_path: Path, rule: LSTMRule) -> None:
    """Loadable files whose record is wrong: a CheckpointError naming the problem, never a raw
    TypeError or KeyError from inside; non-finite weights are refused (an in-place step relies
    on finite weights for finite updates)."""
    good = rule_to_dict(rule)
    nan = rule_to_dict(rule)
    nan["state_dict"]["out_weight"][0] = float("nan")
    cases = {
        "config": {**good, "config": [1, 2]},
        "config value": {**good, "config": {"hidden_size": "many"}},
        "metadata": {**good, "metadata": [1]},
        "checkpoint": {"best_rule": good},  # no latest rule
        "nan": nan,
    }
    for name, record in cases.items():
        atomic_save(record, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError):
            load_rule(tmp_path / f"{name}.pt", which="latest")
    with pytest.raises(CheckpointError, match="non-finite values in the weights"):
        load_rule(tmp_path / "nan.pt")


def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    """Not mkstemp's owner-only 0600: the mode a plain open() gives under the umask."""
    from learned_opt.files import atomic_write_text

    (tmp_path / "plain").write_text("x")
    atomic_save({"x": torch.ones(1)}, tmp_path / "a.pt")
    atomic_write_text(tmp_path / "a.json", "{}\n")
    mode = (tmp_path / "plain").stat().st_mode & 0o777
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "a.json").read_text() == "{}\n"
