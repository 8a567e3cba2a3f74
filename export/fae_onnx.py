"""FAE (Flash Attention Entropy) in ONNX: the custom node and its model-local function body.

The node: domain ``toprovar``, op_type ``FlashAttentionEntropy``, inputs (q, k, v) in (B, H, N, d)
layout, outputs (O like q, H float32: (B, Nq) with head_mean=1, else (B, H, Nq)), attributes
``scale`` (float), ``head_mean`` (int), ``plugin_namespace`` ("toprovar") and ``plugin_version`` ("1")
(the last two are what the TensorRT ONNX parser uses to pick the IPluginV3 creator of the same name).

ONNX Runtime runs the model-local function of the same domain/name (``function_proto``): the float32
math of ``toprovar.ops.reference.attention_entropy_reference`` without key masking (the self-attention
the entropy is taken over has no padding). The TensorRT engine builder strips that function from a
copy of the model so that the parser maps the node to the plugin (``strip_local_function``) or, without a
plugin library, drops the node's plugin attributes so that it expands the body (``without_plugin_attributes``).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

DOMAIN = "toprovar"
OP_TYPE = "FlashAttentionEntropy"
PLUGIN_NAMESPACE = "toprovar"
PLUGIN_VERSION = "1"
FUNCTION_VERSION = 1
MIN_OPSET = 18  # Reduce* ops with axes as an input


def node_attributes(scale: float, head_mean: bool) -> dict:
    """The attributes every FAE node carries."""
    return {"scale": float(scale), "head_mean": int(bool(head_mean)),
            "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def function_proto(opset: int) -> onnx.FunctionProto:
    """The local function FlashAttentionEntropy(q, k, v) -> (O, H) in default-domain ops of ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"--opset: FlashAttentionEntropy needs opset >= {MIN_OPSET}, got {opset}")
    F = TensorProto.FLOAT
    mk = helper.make_node

    def attr_ref(name: str, ref: str, typ: int) -> onnx.AttributeProto:
        a = onnx.AttributeProto()
        a.name, a.ref_attr_name, a.type = name, ref, typ
        return a

    c_scale = mk("Constant", [], ["scale_c"])
    c_scale.attribute.append(attr_ref("value_float", "scale", onnx.AttributeProto.FLOAT))
    c_mean = mk("Constant", [], ["head_mean_c"])
    c_mean.attribute.append(attr_ref("value_int", "head_mean", onnx.AttributeProto.INT))
    nodes = [
        mk("Cast", ["q"], ["qf"], to=F),
        mk("Cast", ["k"], ["kf"], to=F),
        mk("Cast", ["v"], ["vf"], to=F),
        mk("Transpose", ["kf"], ["kt"], perm=[0, 1, 3, 2]),
        mk("MatMul", ["qf", "kt"], ["s0"]),
        c_scale,
        mk("Mul", ["s0", "scale_c"], ["s"]),
        mk("Constant", [], ["last"], value_ints=[-1]),
        mk("Constant", [], ["heads"], value_ints=[1]),
        mk("Constant", [], ["zero"], value_float=0.0),
        mk("ReduceMax", ["s", "last"], ["m"], keepdims=1),
        mk("Sub", ["s", "m"], ["x"]),
        mk("Exp", ["x"], ["p"]),
        mk("ReduceSum", ["p", "last"], ["l"], keepdims=1),
        mk("MatMul", ["p", "vf"], ["pv"]),
        mk("Div", ["pv", "l"], ["of"]),
        mk("CastLike", ["of", "q"], ["O"]),
        mk("Mul", ["p", "x"], ["px"]),
        mk("ReduceSum", ["px", "last"], ["spx"], keepdims=0),
        mk("Squeeze", ["l", "last"], ["l0"]),
        mk("Log", ["l0"], ["lnl"]),
        mk("Div", ["spx", "l0"], ["e"]),
        mk("Sub", ["lnl", "e"], ["h0"]),
        mk("Shape", ["k"], ["nk"], start=2, end=3),
        mk("Cast", ["nk"], ["nkf"], to=F),
        mk("Log", ["nkf"], ["lnn"]),
        mk("Max", ["h0", "zero"], ["h1"]),
        mk("Min", ["h1", "lnn"], ["h"]),
        c_mean,
        mk("Cast", ["head_mean_c"], ["use_mean"], to=TensorProto.BOOL),
        mk("If", ["use_mean"], ["H"],
           then_branch=helper.make_graph([mk("ReduceMean", ["h", "heads"], ["hm"], keepdims=0)], "head_mean",
                                         [], [helper.make_tensor_value_info("hm", F, None)]),
           else_branch=helper.make_graph([mk("Identity", ["h"], ["hh"])], "per_head",
                                         [], [helper.make_tensor_value_info("hh", F, None)])),
    ]
    fn = helper.make_function(DOMAIN, OP_TYPE, ["q", "k", "v"], ["O", "H"], nodes,
                              [helper.make_opsetid("", opset)], attributes=[])
    # attributes with defaults (IR >= 9): the plugin fields are declared so that checkers accept them
    fn.attribute_proto.extend([
        helper.make_attribute("scale", 1.0),
        helper.make_attribute("head_mean", 0),
        helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
        helper.make_attribute("plugin_version", PLUGIN_VERSION),
    ])
    fn.doc_string = ("Flash Attention Entropy: O = softmax(scale q k^T) v, H = per-query softmax entropy (nats), "
                     "float32 math, H clamped to [0, ln Nk]; head_mean=1 averages H over heads. "
                     "TensorRT: IPluginV3 creator 'FlashAttentionEntropy' in namespace 'toprovar'.")
    return fn


def fae_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The FAE nodes of the main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def add_local_function(model: onnx.ModelProto, opset: int) -> int:
    """Attach the function body (once) and the ``toprovar`` opset import; returns the number of FAE nodes."""
    nodes = fae_nodes(model)
    if not nodes:
        return 0
    for n in nodes:
        have = {a.name for a in n.attribute}
        if not {"scale", "head_mean"} <= have:
            raise ValueError(f"FlashAttentionEntropy node {n.name!r} lacks scale/head_mean (has {sorted(have)})")
        for k, v in (("plugin_namespace", PLUGIN_NAMESPACE), ("plugin_version", PLUGIN_VERSION)):
            if k not in have:  # what the TensorRT parser needs to pick the plugin
                n.attribute.append(helper.make_attribute(k, v))
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend([*keep, function_proto(opset)])
    ops = {o.domain: o for o in model.opset_import}
    if DOMAIN in ops:
        ops[DOMAIN].version = FUNCTION_VERSION
    else:
        model.opset_import.append(helper.make_opsetid(DOMAIN, FUNCTION_VERSION))
    return len(nodes)


def strip_local_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the FAE function body (TensorRT then maps the node to the plugin)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [f for f in out.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del out.functions[:]
    out.functions.extend(keep)
    return out


def without_plugin_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose FAE nodes lack ``plugin_namespace``/``plugin_version`` (the function declares
    them with defaults): a TensorRT parser then expands the local function even if a creator is registered."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in fae_nodes(out):
        keep = [a for a in n.attribute if a.name not in ("plugin_namespace", "plugin_version")]
        del n.attribute[:]
        n.attribute.extend(keep)
    return out


# ------------------------------------------------------------------------------ torch.onnx (dynamo) translation
def op_schema():
    """An OpSchema for the node (used only to emit it through onnxscript; never registered globally)."""
    from onnx.defs import OpSchema
    A, P = OpSchema.Attribute, OpSchema.FormalParameter
    return OpSchema(
        OP_TYPE, DOMAIN, FUNCTION_VERSION, doc="Flash Attention Entropy (see toprovar.export.fae_onnx)",
        inputs=[P("q", "T"), P("k", "T"), P("v", "T")],
        outputs=[P("O", "T"), P("H", "TH")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "q, k, v, O"),
                          ("TH", ["tensor(float)"], "entropy")],
        attributes=[A("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
                    A("head_mean", OpSchema.AttrType.INT, "1: H averaged over heads (B, Nq)"),
                    A("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
                    A("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version")])


def translation_table() -> dict:
    """``custom_translation_table`` for torch.onnx.export(dynamo=True): the FAE torch op -> the FAE node."""
    import torch
    import onnxscript
    import toprovar.ops  # noqa: F401  (registers torch.ops.toprovar.attention_with_entropy)

    fae_op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, FUNCTION_VERSION), OP_TYPE, op_schema())

    def attention_with_entropy(q, k, v, scale: float, key_lengths=None, head_mean: bool = False):
        if key_lengths is not None:
            raise NotImplementedError("FlashAttentionEntropy export: key_lengths (masked keys) is not supported; "
                                      "entropy is only taken over unpadded self-attention")
        return fae_op(q, k, v, _outputs=2, **node_attributes(scale, head_mean))

    return {torch.ops.toprovar.attention_with_entropy.default: attention_with_entropy}
