"""Export a quantized model as modelopt's unified Hugging Face checkpoint, and load one back.

    rq.export_checkpoint(model, out_dir)      # what TensorRT-LLM, vLLM and SGLang load
    model2 = rq.load_checkpoint(out_dir)      # a runnable model again (== rq.compress_weights(model))

The checkpoint is what modelopt 0.47's `export_hf_checkpoint` writes (docs/modelopt_behaviour.md
§2.4, §4.1, §4.8, §5.6; modelopt/torch/export/unified_export_hf.py, quant_utils.py), every number
computed by refquant's own numerics in the quantizers' flavor:

  FP8 layer    weight        float8_e4m3fn [out, in]   E4M3(W / weight_scale), the FP8QTensor division
               weight_scale  fp32 0-d                  weight amax / 448
               input_scale   fp32 0-d                  input amax / 448 (when the input was calibrated)
  NVFP4 layer  weight        uint8 [out, in/2]         two E2M1 codes per byte, even element low nibble
               weight_scale  float8_e4m3fn [out, in/16]  NVFP4QTensor's per-block scale
               weight_scale_2 fp32 0-d                 weight amax / 2688
               input_scale   fp32 0-d                  input amax / 2688
  attention    k_proj.k_scale, v_proj.v_scale fp32 0-d   calibrated K / V amax / 448; none for the
                                                       constant-amax ("cast") KV modes
  MoE experts  fused (Qwen-MoE, Mixtral, ...): each expert's linears, `experts.{i}.gate_proj` /
               `.up_proj` / `.down_proj`, with the tensors above for the module's format (gate and
               up share one weight amax; names.py gives the hub's names, Mixtral's w1 / w3 / w2);
               gpt-oss: the 3-D weights under their own names, each quantized whole, and
               `{proj}_weight_scale`, `{proj}_weight_scale_2`, `{proj}_input_scale` (experts.py)
  files        config.json (+ quantization_config), hf_quant_config.json, generation_config.json,
               model.safetensors (sharded with an index past max_shard_size, 10 GB by default as
               modelopt's; streamed a layer at a time), and refquant_quantizers.json: refquant's
               exact quantizer state, which runtimes ignore.

"a / c" above is the flavor's division (docs/contract.md §2): IEEE on "modelopt-cpu", a multiply by
fp32(1 / c) on "modelopt-cuda" (modelopt's `tensor / python_float` on a GPU).

Layers that deployment fuses (inputs shared, found as modelopt finds them: one forward of two
tokens with every quantizer off, grouping the quantized linears that receive the same input tensor,
e.g. q/k/v and gate/up) share their input and global weight scales when they are NVFP4: each takes
the group's largest amax. FP8 layers are not fused (modelopt's rule). The export leaves the model
untouched; `compress_weights(model)` applies the same rule and replaces each weight by its exported
round trip, in place, and is what `load_checkpoint` gives back bit for bit (docs/export.md).

  plan.py      what a model exports (ExportPlan): layer formats, fusion groups, K/V scales, names
  experts.py   the MoE experts' tensors, per expert (fused) or per 3-D weight (gpt-oss)
  names.py     the names the checkpoint uses: transformers' load-time renames reversed, as modelopt does
  tensors.py   the checkpoint tensors of one linear, and the weight read back from them
  configs.py   hf_quant_config.json and config.json's quantization_config
  state.py     refquant_quantizers.json: the exact quantizer state
  write.py     export_checkpoint: tensors streamed into shards, files written atomically, rank 0 only
  load.py      compress_weights and load_checkpoint
  validate.py  what load_checkpoint checks before it trusts a folder (files, JSON, tensors, agreement)
  convert.py   a checkpoint's tensors from modelopt's format to compressed-tensors' and back
"""

from .configs import layer_quant_config, quantization_config, summarise_excluded
from .load import compress_weights, load_checkpoint, read_checkpoint_tensors
from .plan import CompressedWeightQuantizer, ExportPlan, LinearExport, layer_format, plan_export, shared_input_groups
from .state import decode_amax, encode_amax
from .tensors import dequantize_linear_weight, export_linear_tensors
from .write import checkpoint_state_dict, checkpoint_tensors, export_checkpoint, parse_shard_size

__all__ = [
    "CompressedWeightQuantizer",
    "ExportPlan",
    "LinearExport",
    "checkpoint_state_dict",
    "checkpoint_tensors",
    "compress_weights",
    "decode_amax",
    "dequantize_linear_weight",
    "encode_amax",
    "export_checkpoint",
    "export_linear_tensors",
    "layer_format",
    "layer_quant_config",
    "load_checkpoint",
    "parse_shard_size",
    "plan_export",
    "quantization_config",
    "read_checkpoint_tensors",
    "shared_input_groups",
    "summarise_excluded",
]
