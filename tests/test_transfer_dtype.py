"""float16 transfer at a site (``transfer-dtype = "float16"``), through the ClientApp's handlers on real Flower
messages: float16 weights are cast to float32 before loading, the site trains in float32 and its reply is float16,
half the bytes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import build_client_app
from server.settings import RunSettings
from shared_models.registry import build_from_settings
from simulation.phantoms import write_phantom_sites

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (site,) = write_phantom_sites(tmp_path_factory.mktemp("f16"), n_sites=1, subjects_per_site=3, shape=(32, 32, 16))
    return site


def _message(message_type: str, config: dict, weights: dict[str, torch.Tensor]) -> Message:
    """An instruction as the SuperNode hands it to the ClientApp."""
    metadata = Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(config)})
    return Message(content=content, metadata=metadata)


def _ask(site_dir: Path, message_type: str, transfer_dtype: str, weights: dict[str, torch.Tensor]) -> Message:
    settings = RunSettings(model="srcnn", batch_size=2, patch_size=16, local_steps=2, eval_max_slices=2,
                           transfer_dtype=transfer_dtype)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = build_client_app([str(site_dir)])(
        _message(message_type, {**settings.round_config(), "server-round": 1}, weights), context)
    assert not reply.has_error(), reply.error
    return reply


def _payload_bytes(record: ArrayRecord) -> tuple[int, int]:
    """(bytes of the values, bytes of the serialised arrays) of a record."""
    return sum(a.numpy().nbytes for a in record.values()), sum(len(a.data) for a in record.values())


def test_float16_weights_are_trained_in_float32_and_the_reply_is_float16_half_the_bytes(site_dir: Path) -> None:
    torch.manual_seed(0)
    model = build_from_settings(RunSettings(model="srcnn"))
    half = {k: v.half() for k, v in model.state_dict().items()}  # what a float16 coordinator sends
    as_float32 = {k: v.float() for k, v in half.items()}  # the same values, sent in float32

    reply32 = _ask(site_dir, "train", "float32", as_float32).content["arrays"]
    reply16 = _ask(site_dir, "train", "float16", half).content["arrays"]

    assert {a.dtype for a in reply32.values()} == {"float32"}
    assert {a.dtype for a in reply16.values()} == {"float16"}
    trained32, trained16 = reply32.to_torch_state_dict(), reply16.to_torch_state_dict()
    assert any(not torch.equal(trained32[k], as_float32[k]) for k in as_float32)  # it trained
    for key, value in trained32.items():  # the same float32 training, rounded for the wire at the end
        assert torch.equal(trained16[key], value.half()), key
    values32, wire32 = _payload_bytes(reply32)
    values16, wire16 = _payload_bytes(reply16)
    assert values16 * 2 == values32 == 4 * sum(v.numel() for v in as_float32.values())
    assert wire16 < 0.52 * wire32  # half, plus each array's small header


def test_float16_weights_are_scored_as_their_float32_values(site_dir: Path) -> None:
    torch.manual_seed(1)
    half = {k: v.half() for k, v in build_from_settings(RunSettings(model="srcnn")).state_dict().items()}
    scores16 = dict(_ask(site_dir, "evaluate", "float16", half).content["metrics"])
    scores32 = dict(_ask(site_dir, "evaluate", "float32", {k: v.float() for k, v in half.items()}).content["metrics"])
    timed = "eval-seconds"
    assert scores16.pop(timed) > 0 and scores32.pop(timed) > 0
    assert scores16 == scores32 and np.isfinite(scores16["psnr"])
