"""The SDK's plain pieces: Datum (both forms), AdamParams' checks, the finished future, the
snapshot names and identities, the ledger's fold, and from_config's argument split
(docs/design.md §15.65 The SDK trains in the caller's process)."""
from __future__ import annotations

import logging

import pytest

from rlstream.core.messages import OptimStepped, RunStarted, SamplerSaved, StateLoaded, StateSaved
from rlstream.sdk.ledger import Ledger, check_name, identity, parse_identity
from rlstream.sdk.service import _options
from rlstream.sdk.types import AdamParams, Datum, Done, ModelInput, TensorData


def test_datum_tokens_and_the_tinker_form_agree():
    plain = Datum(tokens=[5, 6, 7, 8], loss_fn_inputs={"advantage": 1.0})
    tinker = Datum(model_input=ModelInput.from_ints([5, 6, 7]),
                   loss_fn_inputs={"target_tokens": TensorData([6, 7, 8]), "advantage": 1.0})
    assert plain.tokens == tinker.tokens == [5, 6, 7, 8]


@pytest.mark.parametrize("make, match", [
    (lambda: Datum(tokens=[3]), "at least 2 tokens"),
    (lambda: Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2]}), "must be equal"),
])
def test_datum_refuses_what_has_no_next_token(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_adam_params_are_checked():
    assert AdamParams(learning_rate=1e-3, beta2=0.999).beta2 == 0.999
    with pytest.raises(ValueError, match="out of range"):
        AdamParams(learning_rate=1e-3, beta1=1.0)
    with pytest.raises(ValueError, match="out of range"):
        AdamParams(learning_rate=-1.0)


def test_done_hands_back_its_value_and_its_attributes():
    class Out:
        loss_fn_outputs = [1, 2]

    out = Out()
    done = Done(out)
    assert done.result() is out and done.done()
    assert done.loss_fn_outputs == [1, 2]  # the seed's rl_loop reads it without .result()
    with pytest.raises(AttributeError):
        done.missing  # noqa: B018


@pytest.mark.parametrize("name", ["", "..", "../x", ".hidden", "a/b", "x" * 129, "a b"])
def test_names_that_would_leave_their_directory_are_refused(name):
    with pytest.raises(ValueError, match="must be 1-128"):
        check_name(name, "state")


def test_identities_resolve_only_within_their_run_and_kind():
    path = identity("run-a", "sampler_weights", "step-00010")
    assert path == "rlstream://run-a/sampler_weights/step-00010"
    assert parse_identity(path, "run-a", "sampler_weights") == "step-00010"
    assert parse_identity("step-00010", "run-a", "sampler_weights") == "step-00010"  # a bare name
    with pytest.raises(ValueError, match="trainer_job_id='run-b'"):
        parse_identity("rlstream://run-b/sampler_weights/x", "run-a", "sampler_weights")
    with pytest.raises(ValueError, match="not a sampler snapshot identity"):
        parse_identity("rlstream://run-a/state/x", "run-a", "sampler_weights")
    with pytest.raises(ValueError, match="must be 1-128"):
        parse_identity("rlstream://run-a/state/..", "run-a", "state")


def test_the_ledger_folds_steps_snapshots_and_states():
    ledger = Ledger()
    for msg in [RunStarted(run_id="a", config={}), OptimStepped(step=1), OptimStepped(step=2),
                SamplerSaved(name="s", step=2, version=1, sha256="x", bytes=1),
                StateSaved(name="keep", step=2, sha256="y", bytes=1), OptimStepped(step=3),
                SamplerSaved(name="s", step=3, version=2, sha256="z", bytes=1),
                StateSaved(name="later", step=3, sha256="w", bytes=1), StateLoaded(name="keep", step=2)]:
        ledger.apply(msg)
    assert ledger.step == 2 and ledger.steps_logged == 3  # the load set the step back, the log keeps all three
    assert ledger.samplers["s"].version == 2 and ledger.last_version == 2  # the newest save of a name wins
    assert ledger.state_order == ["keep", "later"]
    assert ledger.started.run_id == "a"


def test_hosted_only_arguments_are_reported_and_unknown_ones_refused(caplog):
    with caplog.at_level(logging.WARNING):
        kept = _options({"training_shape_id": "shape", "api_key": "k", "seed": 3})
    assert kept == {"seed": 3}
    assert "training_shape_id" in caplog.text and "api_key" in caplog.text
    with pytest.raises(TypeError, match="unknown argument"):
        _options({"lora_rnk": 4})
