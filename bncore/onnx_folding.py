"""Folding every foldable batch norm of an ONNX model into the layer next to it.

`fold_onnx_model` walks the graph's BatchNormalization nodes and folds each
into its Conv, ConvTranspose, Gemm or MatMul(+Add) neighbour with the
functions of `bncore.folding` (the arithmetic lives there only): into the
layer before it ('layer_bn') when that layer's output feeds only the batch
norm, else into the layer after it ('bn_layer') when the batch norm's output
feeds only that layer. Each fold can be verified on random input by running
the original and the folded nodes (onnxruntime, or onnx's NumPy reference
evaluator without it). The onnx package is an optional dependency, imported
when the function is called.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

import numpy as np

from . import _checks as chk
from .folding import fold_batch_norm, fold_into_conv, fold_into_conv_transpose, fold_into_linear

__all__ = ["fold_onnx_model", "FoldRecord", "FoldReport"]

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class FoldRecord:
    """What `fold_onnx_model` did with one BatchNormalization node.

    Parameters
    ----------
    bn : str
        The batch norm's node name (``op(output)`` for an unnamed node).
    layer : str or None
        The layer it was (or would be) folded into; None when no neighbour
        qualified.
    kind : str or None
        The layer's op type: 'Conv', 'ConvTranspose', 'Gemm' or 'MatMul'.
    order : {'layer_bn', 'bn_layer'} or None
        'layer_bn': the batch norm follows the layer; 'bn_layer': it
        precedes it.
    folded : bool
        Whether the fold was made.
    exact : bool or None
        Whether the fold is exact in exact arithmetic (None when no fold was
        planned).
    max_abs_error : float or None
        The largest difference between the original and the folded nodes on
        random input (None when not verified).
    reason : str
        Why it was not folded, or a note on an inexact fold.

    Examples
    --------
    >>> from bncore.onnx_folding import FoldRecord
    >>> print(FoldRecord("bn1", "conv1", "Conv", "layer_bn", True, True, 2.4e-07))
    conv1 -> bn1 (Conv, layer_bn): folded, exact, max abs error 2.4e-07
    """

    bn: str
    layer: str | None = None
    kind: str | None = None
    order: str | None = None
    folded: bool = False
    exact: bool | None = None
    max_abs_error: float | None = None
    reason: str = ""

    def __str__(self) -> str:
        where = self.bn if self.layer is None else (
            f"{self.layer} -> {self.bn}" if self.order == "layer_bn" else f"{self.bn} -> {self.layer}")
        head = f"{where}" + (f" ({self.kind}, {self.order})" if self.kind else "")
        parts = ["folded" if self.folded else "not folded"]
        if self.exact is not None:
            parts.append("exact" if self.exact else "INEXACT")
        if self.max_abs_error is not None:
            parts.append(f"max abs error {self.max_abs_error:.3g}")
        return f"{head}: {', '.join(parts)}" + (f": {self.reason}" if self.reason else "")


class FoldReport(list):
    """The list of `FoldRecord` of `fold_onnx_model`, one per BatchNormalization
    node in graph order; ``str()`` is a readable summary.

    Examples
    --------
    >>> from bncore.onnx_folding import FoldRecord, FoldReport
    >>> report = FoldReport([FoldRecord("bn1", "conv1", "Conv", "layer_bn", True, True),
    ...                      FoldRecord("bn2", reason="not foldable: training_mode=1")])
    >>> print(report)
    1 of 2 BatchNormalization nodes folded
      conv1 -> bn1 (Conv, layer_bn): folded, exact
      bn2: not folded: not foldable: training_mode=1
    >>> [r.bn for r in report.folded]
    ['bn1']
    """

    @property
    def folded(self) -> list[FoldRecord]:
        """The records of the folded batch norms."""
        return [r for r in self if r.folded]

    def __str__(self) -> str:
        lines = [f"{len(self.folded)} of {len(self)} BatchNormalization nodes folded"]
        return "\n".join(lines + [f"  {r}" for r in self])


# ---- the graph ---------------------------------------------------------------------------

def _label(node: Any) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def _subgraph_inputs(onnx: Any, graph: Any, acc: set[str]) -> set[str]:
    for node in graph.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else (
                list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
            for sg in subs:
                for n in sg.node:
                    acc.update(n.input)
                _subgraph_inputs(onnx, sg, acc)
    return acc


class _Graph:
    """The model's top-level graph with its constants, producers and consumers
    (recomputed after each fold)."""

    def __init__(self, onnx: Any, model: Any):
        self.onnx, self.model, self.g = onnx, model, model.graph
        from onnx import numpy_helper
        self.to_array = numpy_helper.to_array
        self.from_array = numpy_helper.from_array
        self.outputs = {o.name for o in self.g.output}
        self.names = {v.name for v in list(self.g.input) + list(self.g.output)
                      + list(self.g.initializer) + list(self.g.value_info)}
        self.names |= {t for n in self.g.node for t in list(n.input) + list(n.output)}
        self.node_names = {n.name for n in self.g.node}
        self.touched: set[str] = set()  # tensors whose last user a fold may have removed
        self.cache: dict[str, np.ndarray] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # inference is a help, not a requirement
            inferred = self.g
        self.types: dict[str, tuple[int, list[int | None]]] = {}
        for v in list(inferred.input) + list(inferred.output) + list(inferred.value_info):
            tt = v.type.tensor_type
            if v.type.HasField("tensor_type") and tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
                self.types[v.name] = (tt.elem_type, dims)
        self.refresh()

    def refresh(self) -> None:
        # constants are read when asked for (a tensor name is never reused for another value)
        self.const_protos: dict[str, Any] = {t.name: t for t in self.g.initializer}
        for n in self.g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1:
                a = n.attribute[0]
                if a.name in ("value", "value_float", "value_floats"):
                    self.const_protos[n.output[0]] = a
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.in_subgraphs = _subgraph_inputs(self.onnx, self.g, set())

    def const(self, name: str) -> np.ndarray | None:
        if name in self.cache:
            return self.cache[name]
        p = self.const_protos.get(name) if name else None
        if p is None:
            return None
        if isinstance(p, self.onnx.AttributeProto):
            a = self.to_array(p.t) if p.name == "value" else np.array(
                self.onnx.helper.get_attribute_value(p), np.float32)
        else:
            a = self.to_array(p)
        self.cache[name] = a
        return a

    def only_feeds(self, tensor: str, node: Any) -> str | None:
        """Why `tensor` cannot be folded away (None when node is its only user)."""
        users = self.consumers.get(tensor, [])
        if tensor in self.outputs:
            return f"{tensor!r} is a graph output"
        if tensor in self.in_subgraphs:
            return f"{tensor!r} is used inside a subgraph"
        if len(users) != 1 or users[0] != node:
            return f"{tensor!r} has {len(users)} consumers"
        return None

    def rank(self, tensor: str) -> int | None:
        t = self.types.get(tensor)
        return None if t is None else len(t[1])

    def fresh(self, base: str) -> str:
        name, k = f"{base}_folded", 1
        while name in self.names or name in self.node_names:
            k += 1
            name = f"{base}_folded_{k}"
        self.names.add(name)
        self.node_names.add(name)
        return name

    def node_index(self, node: Any) -> int:
        for i, n in enumerate(self.g.node):
            if n == node:  # by value: a node's outputs are unique in the graph
                return i
        raise ValueError(f"model: node {_label(node)!r} is not in the graph")

    def replace(self, old: list[Any], new: list[Any], inits: dict[str, np.ndarray]) -> None:
        """Put `new` where the first of `old` was, with its new initializers; the
        inputs `old` used are candidates for removal once unused."""
        at = min(self.node_index(n) for n in old)
        for n in old:
            self.touched.update(t for t in list(n.input) + list(n.output) if t)
        for n in old:
            del self.g.node[self.node_index(n)]
        for k, n in enumerate(new):
            self.g.node.insert(at + k, n)
        for name, a in inits.items():
            self.g.initializer.append(self.from_array(a, name))
        self.refresh()

    def clean(self) -> None:
        """Drop what the folds left unused: initializers, Constant nodes and
        value_info of tensors no node reads any more."""
        def used() -> set[str]:
            u = {i for n in self.g.node for i in n.input} | self.outputs | self.in_subgraphs
            return u
        u = used()
        dead_consts = [n for n in self.g.node if n.op_type == "Constant"
                       and n.output[0] in self.touched and n.output[0] not in u]
        for n in dead_consts:
            del self.g.node[self.node_index(n)]
        u = used()
        keep = [t for t in self.g.initializer if t.name in u or t.name not in self.touched]
        dropped = {t.name for t in self.g.initializer} - {t.name for t in keep}
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        keep_in = [v for v in self.g.input if v.name not in dropped]
        del self.g.input[:]
        self.g.input.extend(keep_in)
        produced = {o for n in self.g.node for o in n.output} | {v.name for v in self.g.input}
        keep_vi = [v for v in self.g.value_info
                   if v.name in produced or v.name not in self.touched]
        del self.g.value_info[:]
        self.g.value_info.extend(keep_vi)


# ---- one fold ----------------------------------------------------------------------------

@dataclasses.dataclass
class _Plan:
    layer: Any
    kind: str
    order: str
    old: list[Any]                 # the original nodes, data flowing old[0] -> old[-1]
    new: list[Any]                 # their replacement
    inits: dict[str, np.ndarray]   # new initializers
    data_in: str                   # the tensor entering the nodes
    in_shape: list[int]
    data_out: str                  # the tensor leaving them (the same name before and after)
    exact: bool
    note: str = ""


def _attrs(onnx: Any, node: Any) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _copy_node(onnx: Any, node: Any, inputs: list[str], outputs: list[str],
               **attrs: Any) -> Any:
    n = onnx.NodeProto()
    n.CopyFrom(node)
    del n.input[:]
    n.input.extend(inputs)
    del n.output[:]
    n.output.extend(outputs)
    for k, v in attrs.items():
        for i, a in enumerate(n.attribute):
            if a.name == k:
                del n.attribute[i]
                break
        n.attribute.append(onnx.helper.make_attribute(k, v))
    return n


def _spatial(G: _Graph, tensor: str, rank: int, kernel: tuple[int, ...], attrs: dict[str, Any],
             batch_channels: tuple[int, int]) -> list[int]:
    """A concrete input shape for verifying: the inferred one where known."""
    known = G.types.get(tensor, (0, [None] * rank))[1]
    known = known if len(known) == rank else [None] * rank
    dil = attrs.get("dilations", [1] * len(kernel))
    st = attrs.get("strides", [1] * len(kernel))
    shape = [known[0] or batch_channels[0], batch_channels[1]]
    for i, k in enumerate(kernel):
        shape.append(known[2 + i] or max(8, dil[i] * (k - 1) + 1) + st[i])
    return shape


def _conv_exact_before(attrs: dict[str, Any], kernel: tuple[int, ...]) -> tuple[bool, str]:
    """BN before a Conv: exact without zero padding."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER") and any(k > 1 for k in kernel):
        return False, f"batch norm before a zero-padded Conv (auto_pad={auto})"
    if auto in ("NOTSET", "") and any(attrs.get("pads", [])):
        return False, f"batch norm before a zero-padded Conv (pads={list(attrs['pads'])})"
    return True, ""


def _conv_t_exact_before(attrs: dict[str, Any], kernel: tuple[int, ...]) -> tuple[bool, str]:
    """BN before a ConvTranspose: exact with stride 1 and the output cropped by
    dilation * (kernel - 1) on both sides (fold_into_conv_transpose)."""
    nd = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if "output_shape" in attrs or auto not in ("NOTSET", ""):
        return False, ("batch norm before a ConvTranspose whose padding is decided at run time "
                       "(output_shape or auto_pad)")
    st = attrs.get("strides", [1] * nd)
    dil = attrs.get("dilations", [1] * nd)
    op = attrs.get("output_padding", [0] * nd)
    pads = attrs.get("pads", [0] * 2 * nd)
    ok = all(st[i] == 1 and pads[i] >= dil[i] * (kernel[i] - 1)
             and pads[nd + i] >= dil[i] * (kernel[i] - 1) + op[i] for i in range(nd))
    if ok:
        return True, ""
    return False, ("batch norm before a ConvTranspose whose border outputs see fewer kernel taps "
                   f"(strides={list(st)}, pads={list(pads)}, output_padding={list(op)})")


def _row_bias(c: np.ndarray | None, N: int) -> np.ndarray | None:
    """A Gemm/Add bias that is the same for every row, as a length-N float64 vector."""
    if c is None:
        return np.zeros(N)
    if c.size == 1 or c.shape in ((N,), (1, N)):
        return np.broadcast_to(c.reshape(-1).astype(np.float64), (N,)).copy()
    return None


def _plan_layer_bn(G: _Graph, bn: Any, scale: Any, shift: Any) -> tuple[_Plan | None, str]:
    """The batch norm folded into the layer that produces its input."""
    onnx, x = G.onnx, bn.input[0]
    layer: Any = G.producer.get(x)
    if layer is None:
        return None, "its input comes from no node"
    add = None
    if layer.op_type == "Add" and layer.domain in ("", "ai.onnx"):
        prod = [G.producer.get(i) for i in layer.input]
        mms = [k for k, p in enumerate(prod) if p is not None and p.op_type == "MatMul"
               and G.const(layer.input[1 - k]) is not None]
        if len(layer.input) == 2 and mms:
            add, layer = layer, prod[mms[0]]
    if layer.op_type not in LAYER_OPS or layer.domain not in ("", "ai.onnx"):
        return None, f"its input comes from {layer.op_type} {_label(layer)!r}"
    lname = _label(layer)
    why = G.only_feeds(x, bn) or (add is not None and G.only_feeds(layer.output[0], add))
    if why:
        return None, f"{layer.op_type} {lname!r}'s output cannot be removed: {why}"
    a = _attrs(onnx, layer)
    W = G.const(layer.input[1]) if len(layer.input) > 1 else None
    B_name = layer.input[2] if len(layer.input) > 2 else ""
    B = G.const(B_name)
    if W is None or (B_name and B is None):
        return None, f"{layer.op_type} {lname!r} has a weight or bias that is not a constant"
    C = scale.shape[0]
    inits: dict[str, np.ndarray] = {}
    wname, bname = G.fresh(layer.input[1]), G.fresh(B_name or f"{lname}_bias")
    if layer.op_type in ("Conv", "ConvTranspose"):
        g = int(a.get("group", 1))
        transposed = layer.op_type == "ConvTranspose"
        cout = g * W.shape[1] if transposed else W.shape[0]
        if cout != C:
            return None, f"{lname!r} has {cout} output channels, the batch norm {C}"
        fold = fold_into_conv_transpose if transposed else fold_into_conv
        inits[wname], inits[bname] = fold(W, B, scale, shift, groups=g)
        new = [_copy_node(onnx, layer, [layer.input[0], wname, bname], [bn.output[0]])]
        cin = W.shape[0] if transposed else g * W.shape[1]
        shape = _spatial(G, layer.input[0], W.ndim, W.shape[2:], a, (2, cin))
    else:  # Gemm, MatMul(+Add): y = A @ W.T + b with W (N, K)
        if W.ndim != 2:
            return None, f"{layer.op_type} {lname!r}'s weight is not a 2-D constant"
        if layer.op_type == "Gemm":
            Wl = float(a.get("alpha", 1.0)) * (W if a.get("transB", 0) else W.T).astype(np.float64)
            c = _row_bias(B, Wl.shape[0])
            bias = None if c is None else float(a.get("beta", 1.0)) * c
        else:
            if G.rank(layer.input[0]) != 2:
                return None, (f"MatMul {lname!r}: its input is not known to be 2-D (the batch norm "
                              f"normalizes axis 1)")
            Wl = W.T.astype(np.float64)
            bias = _row_bias(None if add is None else G.const(
                add.input[1] if add.input[0] == layer.output[0] else add.input[0]), Wl.shape[0])
        if bias is None:
            return None, f"{lname!r}'s bias differs between rows"
        if Wl.shape[0] != C:
            return None, f"{lname!r} has {Wl.shape[0]} outputs, the batch norm {C}"
        Wf, bf = fold_into_linear(Wl, bias, scale, shift)
        if layer.op_type == "Gemm":
            inits[wname] = (Wf if a.get("transB", 0) else Wf.T).astype(W.dtype)
            inits[bname] = bf.astype(W.dtype)
            new = [_copy_node(onnx, layer, [layer.input[0], wname, bname], [bn.output[0]],
                              alpha=1.0, beta=1.0)]
            shape = [3, Wl.shape[1]][::-1 if a.get("transA", 0) else 1]
        else:
            inits[wname], inits[bname] = Wf.T.astype(W.dtype), bf.astype(W.dtype)
            mid = layer.output[0]
            addn = onnx.helper.make_node("Add", [mid, bname], [bn.output[0]],
                                         name=add.name if add is not None else G.fresh(
                                             f"{lname}_bias_add"))
            new = [_copy_node(onnx, layer, [layer.input[0], wname], [mid]), addn]
            known = G.types.get(layer.input[0], (0, [None, None]))[1]
            shape = [known[0] or 3, Wl.shape[1]]
    old = [layer] + ([add] if add is not None else []) + [bn]
    return _Plan(layer, layer.op_type, "layer_bn", old, new, inits, layer.input[0], shape,
                 bn.output[0], True), ""


def _plan_bn_layer(G: _Graph, bn: Any, scale: Any, shift: Any) -> tuple[_Plan | None, str]:
    """The batch norm folded into the one layer its output feeds."""
    onnx, y = G.onnx, bn.output[0]
    users = G.consumers.get(y, [])
    if len(users) != 1:
        return None, f"its output has {len(users)} consumers"
    layer = users[0]
    lname = _label(layer)
    why = G.only_feeds(y, layer)
    if why:
        return None, why
    if layer.op_type not in LAYER_OPS or layer.domain not in ("", "ai.onnx"):
        return None, f"its output feeds {layer.op_type} {lname!r}"
    if layer.input[0] != y:
        return None, f"its output is not the data input of {layer.op_type} {lname!r}"
    a = _attrs(onnx, layer)
    W = G.const(layer.input[1]) if len(layer.input) > 1 else None
    B_name = layer.input[2] if len(layer.input) > 2 else ""
    B = G.const(B_name)
    if W is None or (B_name and B is None):
        return None, f"{layer.op_type} {lname!r} has a weight or bias that is not a constant"
    C, x = scale.shape[0], bn.input[0]
    exact_if_no_shift = not np.any(shift)
    inits: dict[str, np.ndarray] = {}
    wname, bname = G.fresh(layer.input[1]), G.fresh(B_name or f"{lname}_bias")
    if layer.op_type in ("Conv", "ConvTranspose"):
        g = int(a.get("group", 1))
        transposed = layer.op_type == "ConvTranspose"
        cin = W.shape[0] if transposed else g * W.shape[1]
        if cin != C:
            return None, f"{lname!r} has {cin} input channels, the batch norm {C}"
        kernel = W.shape[2:]
        exact, note = (_conv_t_exact_before if transposed else _conv_exact_before)(a, kernel)
        if not exact and exact_if_no_shift:
            exact, note = True, ""
        fold = fold_into_conv_transpose if transposed else fold_into_conv
        inits[wname], inits[bname] = fold(W, B, scale, shift, groups=g, order="bn_layer")
        new = [_copy_node(onnx, layer, [x, wname, bname], list(layer.output))]
        shape = _spatial(G, x, W.ndim, kernel, a, (2, cin))
    else:
        exact, note = True, ""
        if W.ndim != 2:
            return None, f"{layer.op_type} {lname!r}'s weight is not a 2-D constant"
        if layer.op_type == "Gemm":
            if a.get("transA", 0):
                return None, f"Gemm {lname!r} has transA=1 (the batch norm's channels are its rows)"
            Wl = float(a.get("alpha", 1.0)) * (W if a.get("transB", 0) else W.T).astype(np.float64)
            c = _row_bias(B, Wl.shape[0])
            bias = None if c is None else float(a.get("beta", 1.0)) * c
            if bias is None:
                return None, f"{lname!r}'s bias differs between rows"
        else:
            if G.rank(y) != 2:
                return None, (f"MatMul {lname!r}: its input is not known to be 2-D (the batch norm "
                              f"normalizes axis 1)")
            Wl, bias = W.T.astype(np.float64), np.zeros(W.shape[1])
        if Wl.shape[1] != C:
            return None, f"{lname!r} has {Wl.shape[1]} inputs, the batch norm {C}"
        Wf, bf = fold_into_linear(Wl, bias, scale, shift, order="bn_layer")
        if layer.op_type == "Gemm":
            inits[wname] = (Wf if a.get("transB", 0) else Wf.T).astype(W.dtype)
            inits[bname] = bf.astype(W.dtype)
            new = [_copy_node(onnx, layer, [x, wname, bname], list(layer.output),
                              alpha=1.0, beta=1.0)]
        else:
            inits[wname], inits[bname] = Wf.T.astype(W.dtype), bf.astype(W.dtype)
            mid = G.fresh(layer.output[0])
            new = [_copy_node(onnx, layer, [x, wname], [mid]),
                   onnx.helper.make_node("Add", [mid, bname], list(layer.output),
                                         name=G.fresh(f"{lname}_bias_add"))]
        known = G.types.get(x, (0, [None, None]))[1]
        shape = [(known[0] if len(known) == 2 else None) or 3, C]
    return _Plan(layer, layer.op_type, "bn_layer", [bn, layer], new, inits, x, shape,
                 layer.output[0], exact, note), ""


# ---- verification ------------------------------------------------------------------------

def _run(onnx: Any, G: _Graph, nodes: list[Any], inits: dict[str, np.ndarray], data_in: str,
         x: np.ndarray, data_out: str) -> np.ndarray:
    """Run the nodes alone on x: onnxruntime (graph optimizations off, so it does
    not fold the original itself) or, without it, onnx's NumPy reference."""
    h = onnx.helper
    made = {o for n in nodes for o in n.output}
    needed = {i for n in nodes for i in n.input if i and i != data_in and i not in made}
    old = {k: G.const(k) for k in needed if k not in inits}
    missing = [k for k, v in old.items() if v is None]
    if missing:
        raise ValueError(f"inputs {missing} are not constants")
    inits = {**{k: v for k, v in old.items() if v is not None}, **inits}
    elem = h.np_dtype_to_tensor_dtype(x.dtype)  # the layers' output type is their input's
    graph = h.make_graph(
        nodes, "fold_check", [h.make_tensor_value_info(data_in, elem, list(x.shape))],
        [h.make_tensor_value_info(data_out, elem, None)],
        initializer=[G.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = h.make_model(graph, opset_imports=list(G.model.opset_import))
    m.ir_version = G.model.ir_version
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        from onnx.reference import ReferenceEvaluator
        res: Any = ReferenceEvaluator(m).run(None, {data_in: x})
        return np.asarray(res[0])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(m.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception:  # e.g. no kernel for this dtype: the reference evaluator has one
        from onnx.reference import ReferenceEvaluator
        res = ReferenceEvaluator(m).run(None, {data_in: x})
        return np.asarray(res[0])
    return np.asarray(sess.run(None, {data_in: x})[0])


def _verify(onnx: Any, G: _Graph, plan: _Plan, rng: np.random.Generator, rtol: float | None,
            atol: float | None) -> tuple[float, bool, float, float]:
    """(max abs error, within tolerance, rtol, atol) of the folded nodes against the
    original: max |folded - original| <= atol + rtol * max |original|, a norm-wise
    bound (elementwise, outputs near 0 would fail on the rounding of the large
    terms they sum)."""
    elem = G.types.get(plan.data_in, (0, []))[0]
    dt = (onnx.helper.tensor_dtype_to_np_dtype(elem) if elem
          else next(iter(plan.inits.values())).dtype)
    x = rng.standard_normal(plan.in_shape).astype(dt)
    want = _run(onnx, G, plan.old, {}, plan.data_in, x, plan.data_out).astype(np.float64)
    got = _run(onnx, G, plan.new, plan.inits, plan.data_in, x, plan.data_out).astype(np.float64)
    if got.shape != want.shape:
        return float("inf"), False, 0.0, 0.0
    low = np.dtype(dt).itemsize < 4  # float16, bfloat16
    rtol = (5e-3 if low else 1e-4) if rtol is None else rtol
    atol = (1e-3 if low else 1e-5) if atol is None else atol
    err = float(np.abs(got - want).max(initial=0.0))
    return err, err <= atol + rtol * float(np.abs(want).max(initial=0.0)), rtol, atol


# ---- the pass ----------------------------------------------------------------------------

def _bn_coefficients(G: _Graph, bn: Any) -> tuple[Any, Any, str]:
    """(scale, shift, '') of an eval-mode BatchNormalization with constant
    parameters, or (None, None, why not)."""
    a = _attrs(G.onnx, bn)
    if a.get("training_mode", 0):
        return None, None, "training_mode=1"
    if a.get("spatial", 1) == 0:
        return None, None, "spatial=0 (per-activation statistics)"
    if len(bn.input) < 5:
        return None, None, "fewer than 5 inputs"
    extra = [o for o in bn.output[1:] if o and (o in G.consumers or o in G.outputs)]
    if extra:
        return None, None, f"its statistics outputs {extra} are used"
    vals = [G.const(n) for n in bn.input[1:5]]
    missing = [n for n, v in zip(bn.input[1:5], vals) if v is None]
    if missing:
        return None, None, f"parameters {missing} are not constants"
    s, b, m, v = (np.asarray(p).reshape(-1) for p in vals)
    try:
        scale, shift = fold_batch_norm(m, v, s, b, eps=float(a.get("epsilon", 1e-5)))
    except (TypeError, ValueError) as e:
        return None, None, f"its parameters are not foldable ({e})"
    return scale, shift, ""


def fold_onnx_model(model: Any, *, verify: bool = True, rtol: float | None = None,
                    atol: float | None = None,
                    seed: int = 0, allow_inexact: bool = False,
                    save_to: str | os.PathLike[str] | None = None) -> tuple[Any, FoldReport]:
    """Fold every foldable BatchNormalization of an ONNX model into its neighbour.

    A batch norm (of the top-level graph) whose input comes from a Conv,
    ConvTranspose, Gemm, or MatMul (optionally followed by an Add of a
    constant bias) is folded into that layer ('layer_bn') when the layer's
    output feeds nothing else and is not a graph output. Otherwise, when its
    own output feeds only the data input of such a layer and is not a graph
    output, it is folded into that layer ('bn_layer'). The weights come from `fold_into_conv`,
    `fold_into_conv_transpose` and `fold_into_linear` (a Gemm's ``alpha``,
    ``beta`` and ``transB`` are taken into the weight and bias; MatMul needs a
    2-D input, since the batch norm normalizes axis 1, and gets an Add of the
    folded bias). Folded weights are new initializers, so an initializer
    shared with another node is never changed; ones no node uses any more are
    removed.

    A batch norm before a zero-padded Conv (or a ConvTranspose whose border
    outputs see fewer kernel taps, see `fold_into_conv_transpose`) cannot be
    folded exactly, unless its shift is 0: it is reported and left alone
    unless ``allow_inexact=True``. A batch norm in training mode, with
    ``spatial=0``, with non-constant parameters, or whose statistics outputs
    are used, is reported as not foldable.

    Parameters
    ----------
    model : onnx.ModelProto, str, os.PathLike or bytes
        The model, a file path or serialized bytes. A ModelProto is not
        changed.
    verify : bool, default True
        Run the original and the folded nodes on the same random input
        (onnxruntime with graph optimizations off, else onnx's NumPy
        reference evaluator) and keep a fold only if ``max |folded - original|
        <= atol + rtol * max |original|`` (an inexact fold allowed by
        ``allow_inexact`` is kept and its error reported). A fold that cannot
        be run is not made.
    rtol, atol : float, optional
        The verification's tolerances, ``>= 0``; by default 1e-4 and 1e-5, or
        5e-3 and 1e-3 for a float16 (or bfloat16) model.
    seed : int, default 0
        Seed of the random input, ``>= 0``.
    allow_inexact : bool, default False
        Also fold batch norms whose fold is not exact.
    save_to : str or os.PathLike, optional
        Also write the folded model there.

    Returns
    -------
    folded_model : onnx.ModelProto
        The folded model; it passes ``onnx.checker.check_model``.
    report : FoldReport
        A list of `FoldRecord`, one per BatchNormalization node (node names,
        kind, order, folded or not and why, exact or not, max abs error),
        whose ``str()`` is a readable summary; ``report.folded`` lists the
        folded ones.

    Raises
    ------
    ImportError
        If the onnx package is missing.
    TypeError
        If ``model`` is not a ModelProto, path or bytes, or a flag is not a
        bool.
    ValueError
        If a tolerance or the seed is out of range, or the model fails
        ``onnx.checker``.

    Examples
    --------
    >>> import onnx
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> rng = np.random.default_rng(0)
    >>> f32 = lambda a: np.asarray(a, np.float32)
    >>> inits = [numpy_helper.from_array(f32(rng.standard_normal((4, 3, 3, 3))), "W")] + [
    ...     numpy_helper.from_array(f32(v), k) for k, v in
    ...     [("s", [1, 2, 3, 4]), ("b", [0, 1, 0, 1]), ("m", [0, 1, 2, 3]), ("v", [1, 1, 4, 4])]]
    >>> graph = helper.make_graph(
    ...     [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
    ...      helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")],
    ...     "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
    ...     initializer=inits)
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    >>> folded, report = bncore.fold_onnx_model(model)
    >>> [n.op_type for n in folded.graph.node]
    ['Conv']
    >>> print(report)  # doctest: +ELLIPSIS
    1 of 1 BatchNormalization nodes folded
      conv -> bn (Conv, layer_bn): folded, exact, max abs error ...
    """
    try:
        import onnx
    except ImportError as e:
        raise ImportError("fold_onnx_model needs the onnx package: pip install onnx "
                          "(and onnxruntime to verify with it)") from e
    chk.onnx_model_source(model, onnx.ModelProto)
    verify = chk.flag(verify, "verify")
    allow_inexact = chk.flag(allow_inexact, "allow_inexact")
    rtol = None if rtol is None else chk.real(rtol, "rtol", 0.0)
    atol = None if atol is None else chk.real(atol, "atol", 0.0)
    seed = chk.integer(seed, "seed")
    chk.optional_path(save_to, "save_to")
    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    elif not isinstance(model, onnx.ModelProto):
        model = onnx.load(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"model: expected a valid ONNX model, onnx.checker says: {e}") from e
    out = onnx.ModelProto()
    out.CopyFrom(model)
    G = _Graph(onnx, out)
    rng = np.random.default_rng(seed)
    report = FoldReport()
    for bn in [n for n in G.g.node if n.op_type == "BatchNormalization"
               and n.domain in ("", "ai.onnx")]:
        rec = FoldRecord(_label(bn))
        report.append(rec)
        scale, shift, why = _bn_coefficients(G, bn)
        if scale is None:
            rec.reason = f"not foldable: {why}"
            continue
        plan, why_before = _plan_layer_bn(G, bn, scale, shift)
        why_after = ""
        if plan is None:
            plan, why_after = _plan_bn_layer(G, bn, scale, shift)
        if plan is None:
            rec.reason = f"no layer to fold into: before it, {why_before}; after it, {why_after}"
            continue
        rec.layer, rec.kind, rec.order, rec.exact = _label(plan.layer), plan.kind, plan.order, \
            plan.exact
        if not plan.exact and not allow_inexact:
            rec.reason = f"{plan.note}: not exact, left alone (allow_inexact=True folds it)"
            continue
        if verify:
            try:
                rec.max_abs_error, ok, rt, at = _verify(onnx, G, plan, rng, rtol, atol)
            except Exception as e:  # a runtime's refusal, reported
                rec.reason = f"could not verify ({type(e).__name__}: {e}), left alone"
                continue
            if not ok and plan.exact:
                rec.reason = (f"verification failed (max abs error {rec.max_abs_error:.3g} over "
                              f"atol={at:g} + rtol={rt:g} * max |original|), left alone")
                continue
        G.replace(plan.old, plan.new, plan.inits)
        rec.folded = True
        if not plan.exact:
            rec.reason = plan.note
    G.clean()
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"model: the folded model fails onnx.checker: {e}") from e
    if save_to is not None:
        onnx.save(out, os.fspath(save_to))
    return out, report
