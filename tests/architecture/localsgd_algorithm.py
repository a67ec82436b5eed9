"""A third algorithm that lives outside smolcluster, to prove that adding one needs only its module
and its registry entry: local SGD. Each worker trains alone for `push_interval` steps, then pushes its
weights and takes the server's; the server folds each push in as EDP does.

Registered with SMOLCLUSTER_ALGORITHMS=localsgd_algorithm (this folder on PYTHONPATH).
"""

from types import MappingProxyType

from smolcluster.core.algorithms import Algorithm, FaultMatrixBounds, edp


class Server(edp.Server):
    algorithm = "localsgd"


class Worker(edp.Worker):
    algorithm = "localsgd"


ALGORITHM = Algorithm(
    name="localsgd", display_name="LocalSGD", description="local steps between weight exchanges", module=__name__,
    synchronous=False, config_defaults=MappingProxyType({"worker_update_interval": 10, "push_interval": 10}),
    sim_eval_steps=5, fault_matrix=FaultMatrixBounds(max_steps=60, trigger_step=20, floor=0.85),
)
