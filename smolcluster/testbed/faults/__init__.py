"""Fault injection: schedules (schedule.py), what each action does (actions.py), the injector that
fires them at a running cluster (injector.py), and the fault x algorithm matrix (matrix.py)."""

from smolcluster.testbed.faults.injector import FaultInjector, read_fault_log
from smolcluster.testbed.faults.schedule import Fault, FaultSchedule, RandomFaults, load_faults_file, parse_faults, schedule_for

__all__ = ["Fault", "FaultInjector", "FaultSchedule", "RandomFaults", "load_faults_file", "parse_faults", "read_fault_log", "schedule_for"]
