"""Cutting a traced model at one layer: the head/tail split behind the replay's "fx" path.

:func:`split_graph` cuts a ``torch.fx`` trace (:class:`LeafTracer` keeps the target module as one call) at the
target's node into a *head* (everything up to the target, plus later independent nodes where no in-place op
makes moving them unsafe) and a *tail* (the rest, fed the replaced activation and the saved head values). See
:mod:`cnnlens.capture.replay`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cnnlens.capture.layers import LayerRef

__all__ = ["LeafTracer", "split_graph"]

_INPLACE_FUNCTIONS = {
    "iadd",
    "isub",
    "imul",
    "itruediv",
    "ifloordiv",
    "imod",
    "ipow",
    "iand",
    "ior",
    "ixor",
    "ilshift",
    "irshift",
    "imatmul",
    "setitem",
}


class LeafTracer:
    """Builds an fx tracer that keeps one named module as a single call (imported lazily)."""

    @staticmethod
    def trace(model: nn.Module, leaf: str) -> Any:
        """``torch.fx.GraphModule`` of ``model`` with the module named ``leaf`` kept as one call."""
        import torch.fx

        class Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
                return module_qualified_name == leaf or super().is_leaf_module(m, module_qualified_name)

        graph = Tracer().trace(model)
        return torch.fx.GraphModule(model, graph)


def _mutates(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Whether an fx node modifies its first argument in place."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(
            name in _INPLACE_FUNCTIONS
            or node.kwargs.get("inplace", False)
            or (name.endswith("_") and not name.startswith("_"))
        )
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    return False


def split_graph(gm: Any, ref: LayerRef) -> tuple[Any, Any, list[Any]] | str:
    """Cut a traced model at ``ref``'s node: (head module, tail module, saved head nodes) or why not."""
    import torch.fx

    graph = gm.graph
    nodes = list(graph.nodes)
    hits = [n for n in nodes if n.op == "call_module" and n.target == ref.name]
    wanted = ref.call if ref.call is not None else 0
    if not hits:
        return f"the traced graph has no call of {ref.name!r} (it is inlined or inside a library leaf module)"
    if (ref.call is None and len(hits) > 1) or wanted >= len(hits):
        return f"{ref.name!r} is called {len(hits)} times in the traced graph"
    target = hits[wanted]
    pos = nodes.index(target)
    before = nodes[: pos + 1]
    after = [n for n in nodes[pos + 1 :] if n.op != "output"]
    output = next(n for n in nodes if n.op == "output")
    modules = dict(gm.named_modules())
    depends = {target}
    for node in after:
        if any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    movable = [n for n in after if n not in depends and n.op not in ("placeholder", "output")]
    # Moving independent nodes into the head is unsafe when an in-place op mutates a value read on both
    # sides of the cut (the order of the read and the write would change).
    for node in after:
        if _mutates(node, modules) and node.args and isinstance(node.args[0], torch.fx.Node):
            readers = set(node.args[0].users) | {node}
            sides = {r in depends for r in readers if r in after or r is target}
            if len(sides) > 1:
                movable = []
                break
    head_set = set(before) | set(movable)
    tail_nodes = [n for n in after if n not in head_set]
    needed: list[Any] = []
    for node in [*tail_nodes, output]:
        for arg in node.all_input_nodes:
            if arg in head_set and arg is not target and arg not in needed:
                needed.append(arg)
    saved = [n for n in needed if n.op != "get_attr"]
    consts = [n for n in needed if n.op == "get_attr"]

    head = torch.fx.Graph()
    env: dict[Any, Any] = {}
    for node in nodes:
        if node in head_set:
            env[node] = head.node_copy(node, lambda a: env[a])
    head.output((*[env[n] for n in saved], env[target]))

    tail = torch.fx.Graph()
    tenv: dict[Any, Any] = {target: tail.placeholder("replaced_activation")}
    for i, node in enumerate(saved):
        tenv[node] = tail.placeholder(f"saved_{i}")
    for node in consts:
        tenv[node] = tail.node_copy(node, lambda a: tenv[a])
    for node in tail_nodes:
        tenv[node] = tail.node_copy(node, lambda a: tenv[a])
    tail.output(torch.fx.node.map_arg(output.args[0], lambda a: tenv[a]))
    return torch.fx.GraphModule(gm, head), torch.fx.GraphModule(gm, tail), saved
