"""A half-precision checkpoint stays half precision through every stage of the pipeline (the real stage
functions, on the tiny shape): every tensor each stage writes is read back with MindSpore and its dtype checked."""

import glob
import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import glm3
from conftest import REPO, SAMPLE
from glm3.deploy.export import EXPORT_CONFIG, PREFILL, graph_file
from glm3.pipeline import Layout, load_params
from glm3.pipeline.stages import stage_function
from glm3.train import FinetuneConfig, finetune

MS_DTYPES = {"float16": ms.float16, "bfloat16": ms.bfloat16, "float32": ms.float32}


def stored_dtypes(directory) -> dict[str, ms.Type]:
    """{tensor: dtype} of every weight file (*.ckpt) of a directory, read by MindSpore itself."""
    found = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.ckpt"))):
        found.update({name: value.dtype for name, value in ms.load_checkpoint(path).items()})
    assert found, f"no weights in {directory}"
    return found


def graph_weight_inputs(path) -> dict[str, int]:
    """{weight name: MindIR data type} of the weight inputs of an exported graph."""
    from mindspore.train.mind_ir_pb2 import ModelProto

    model = ModelProto()
    with open(path, "rb") as f:
        model.ParseFromString(f.read())
    assert not model.graph.parameter  # no weight is inside the graph
    # Inputs that are tuples (a paged export's caches) carry no tensor of their own here.
    return {value.name.split(":", 1)[-1]: value.tensor[0].data_type for value in model.graph.input if value.tensor}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_stage_keeps_the_checkpoints_half_precision(dtype, tmp_path):
    from mindspore.train.mind_ir_pb2 import TensorProto

    shutil.copy(os.path.join(REPO, "params.yaml"), tmp_path / "params.yaml")
    shutil.copytree(os.path.join(REPO, "data"), tmp_path / "data")
    params = load_params(
        tmp_path / "params.yaml",
        {
            "convert.dtype": dtype,
            "finetune.lora.enabled": True,
            "finetune.steps": 3,
            "finetune.save_every": 0,
            "adgen_eval.limit": 2,
            "adgen_eval.max_new_tokens": 4,
            "evaluate.subjects": ["civil_servant"],
        },
    )
    layout = Layout.dvc(tmp_path)
    want = MS_DTYPES[dtype]
    for stage in ("download", "convert", "rank_table", "finetune", "merge", "export", "evaluate", "adgen_eval"):
        stage_function(stage)(params, layout)
    for stage in ("convert", "merge", "export"):
        out = layout.outputs[stage]
        assert set(stored_dtypes(out).values()) == {want}, stage
        assert glm3.GLM3Config.from_hf(out).torch_dtype == dtype, stage
    # The adapters (the only tensors fine-tuning wrote) are float32 by design; the base was never rewritten.
    assert set(stored_dtypes(os.path.join(layout.outputs["finetune"], "adapter")).values()) == {ms.float32}
    assert not os.path.exists(os.path.join(layout.outputs["finetune"], "model"))
    with open(os.path.join(layout.outputs["export"], EXPORT_CONFIG), encoding="utf-8") as f:
        export = json.load(f)
    assert (export["dtype"], export["weights"]) == (dtype, "inputs")
    code = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16
    inputs = graph_weight_inputs(graph_file(layout.outputs["export"], PREFILL))
    assert {inputs[name] for name in export["weight_names"]} == {code}
    with open(os.path.join(tmp_path, "metrics", "ceval.json"), encoding="utf-8") as f:
        assert json.load(f)["questions"] == 4
    with open(os.path.join(tmp_path, "metrics", "adgen.json"), encoding="utf-8") as f:
        assert json.load(f)["examples"] == 2


def test_full_fine_tuning_of_a_float16_checkpoint_writes_float16(tiny_dir, tmp_path):
    from glm3.train.merge import merge_run
    from glm3.weights.convert import convert_checkpoint

    base = convert_checkpoint(tiny_dir, tmp_path / "f16", dtype="float16", progress=False).dst
    result = finetune(
        FinetuneConfig(
            model=base,
            data=SAMPLE,
            output=str(tmp_path / "run"),
            max_source_length=32,
            max_target_length=32,
            seq_length=65,
            batch_size=2,
            steps=2,
            progress=False,
        )
    )
    assert set(stored_dtypes(result.weights).values()) == {ms.float16}  # trained in float32, written as the base
    state = ms.load_checkpoint(os.path.join(result.checkpoint, "state.ckpt"))
    assert state["transformer.output_layer.weight"].dtype == ms.float32  # the master weights, to resume exactly
    merged = merge_run(tmp_path / "run", tmp_path / "merged", base)
    assert set(stored_dtypes(merged.dst).values()) == {ms.float16}
    trained = glm3.load_model(result.weights)(Tensor(np.array([[5, 6, 7, 8]], np.int32))).asnumpy()
    again = glm3.load_model(merged.dst)(Tensor(np.array([[5, 6, 7, 8]], np.int32))).asnumpy()
    np.testing.assert_array_equal(trained, again)
