"""lower: IR -> plan of stages (docs/DESIGN.md section 3, step 4).

Fused stages: each maximal run of ops sharing one reduction (allgathers join any
run) is one linear map run by one kernel: scheduled one-shot and two-shot over IPC
when no term crosses a node, hierarchically (IPC + NVSHMEM, codegen/hier.py) when
some do. Reference steps: each op as torch.distributed collectives, split into an
intra-node part and an inter-node part where its groups cross nodes, with local
block permutations where group order and node order differ.
"""

from __future__ import annotations

from ..ir.nodes import IR, Op
from ..mesh import Mesh
from .hier import hier_schedule
from .linear_map import LinearMap, linear_map
from .plan import HierStage, IntraStage, Plan, Stage, Step
from .schedule import one_shot, push, two_shot


def phases(ops: tuple[Op, ...]) -> list[tuple[str, tuple[Op, ...]]]:
    """Split ops into maximal runs with one reduction op each."""
    out: list[tuple[str, list[Op]]] = []
    for op in ops:
        red = None if op.coll == "allgather" else op.redop
        if out and (red is None or out[-1][0] in (red, None)):
            if out[-1][0] is None:
                out[-1] = (red, out[-1][1])
            out[-1][1].append(op)
        else:
            out.append((red, [op]))
    return [(red or "sum", tuple(o)) for red, o in out]


def _steps_for(op: Op, mesh: Mesh) -> tuple[Step, ...]:
    if op.scope != "hier":
        scope = "intra" if op.scope == "intra" else "inter"
        return (Step(op.coll, mesh.partition(op.axes), op.redop, scope),)
    splits = [mesh.split_group(r, op.axes) for r in range(mesh.world_size)]
    intra = tuple(sorted({s[0] for s in splits}, key=min))
    inter = tuple(sorted({s[1] for s in splits}, key=min))
    if op.coll == "allreduce":
        return (Step("allreduce", intra, op.redop, "intra"),
                Step("allreduce", inter, op.redop, "inter"))
    # Block t = j*k + i of the two-level order comes from member part[j][i].
    perms = []
    for r in range(mesh.world_size):
        members = mesh.group_members(r, op.axes)
        nodes = sorted({mesh.node_of(m) for m in members})
        parts = [[m for m in members if mesh.node_of(m) == n] for n in nodes]
        k = len(parts[0])
        gi = {m: p for p, m in enumerate(members)}
        t_of = {m: j * k + i for j, part in enumerate(parts) for i, m in enumerate(part)}
        if op.coll == "allgather":  # final block gi(m) <- two-level block t(m)
            perm = [0] * len(members)
            for m in members:
                perm[gi[m]] = t_of[m]
        else:  # reducescatter: two-level block t(m) <- input block gi(m)
            perm = [0] * len(members)
            for m in members:
                perm[t_of[m]] = gi[m]
        perms.append(tuple(perm))
    permute = Step("permute", scope="local", perms=tuple(perms))
    if op.coll == "allgather":
        return (Step("allgather", intra, op.redop, "intra"),
                Step("allgather", inter, op.redop, "inter"), permute)
    return (permute, Step("reducescatter", inter, op.redop, "inter"),
            Step("reducescatter", intra, op.redop, "intra"))


def _crosses_nodes(lmap: LinearMap, mesh: Mesh) -> bool:
    return any(mesh.node_of(src) != mesh.node_of(r)
               for r, units in enumerate(lmap.out_units) for terms in units
               for src, _, _ in terms)


def lower(ir: IR, mesh: Mesh, batch_invariant: bool = False) -> Plan:
    """Lower the optimised IR to a plan: fused stages (one per run of ops sharing a
    reduction; hierarchical where the run's map crosses nodes) and reference steps.
    `batch_invariant`: hierarchical stages combine every term in the one-node order
    (hier_schedule's split_terms)."""
    one_node = mesh.num_nodes == 1 or all(op.scope == "intra" for op in ir.ops)
    steps: list[Step] = []
    for op in ir.ops:
        steps += _steps_for(op, mesh)
    stages: list[Stage] = []
    units = ir.granularity
    for redop, ops in phases(ir.ops):
        lmap = linear_map(ops, mesh, units, redop)
        if mesh.num_nodes > 1 and _crosses_nodes(lmap, mesh):
            stages.append(HierStage(ops, lmap, hier_schedule(lmap, mesh, batch_invariant)))
            one_node = False
        else:
            stages.append(IntraStage(ops, lmap, {"one_shot": one_shot(lmap),
                                                 "two_shot": two_shot(lmap),
                                                 "push": push(lmap)}))
        units = len(lmap.out_units[0])
    return Plan(tuple(stages), tuple(steps), ir.granularity, one_node)
