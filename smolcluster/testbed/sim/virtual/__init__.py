"""The virtual sim backend: one process, a discrete-event scheduler, virtual time (README: "Virtual backend").

scheduler.py  the event loop, simulated processes, the virtual clock and event queue
network.py    hops, link directions, simulated connections, the Toxiproxy API for faults
nodes.py      the registry's Server/Worker with virtual I/O mixed in; the compute model
cluster.py    VirtualCluster (a SimCluster) and run_virtual, what `smolcluster sim --backend virtual` runs
"""
