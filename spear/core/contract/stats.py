"""The health and statistics replies: component status, execution counts, rates."""

from __future__ import annotations

import msgspec

from spear.core.contract.catalog import TaskInfo


class HealthDetails(msgspec.Struct):
    """Execution counts and system facts for a detailed health reply."""

    active_tasks: int = 0
    running_executions: int = 0
    pending_executions: int = 0
    total_memory_used: int = 0
    total_executions: int = 0
    system_info: dict[str, str] = {}


class GetHealthResponse(msgspec.Struct):
    """healthy, degraded or unhealthy, and which components answer."""

    status: str
    message: str = ""
    error_code: str = ""  # UNAVAILABLE when unhealthy (503)
    uptime_seconds: int = 0
    details: HealthDetails | None = None
    components: dict[str, bool] = {}


class ServiceStats(msgspec.Struct):
    """Uptime, totals and resource use of this service process."""

    uptime_seconds: int = 0
    total_tasks: int = 0
    total_executions: int = 0
    total_memory_used: int = 0
    cpu_usage_percent: float = 0.0
    memory_usage_percent: float = 0.0


class TaskStats(msgspec.Struct):
    """Busy and idle tasks, and the most active ones."""

    active_tasks: int = 0
    idle_tasks: int = 0
    tasks_by_type: dict[str, int] = {}
    most_active_tasks: list[TaskInfo] = []


class ExecutionStats(msgspec.Struct):
    """Executions by status and function, times and success rate."""

    running_executions: int = 0
    pending_executions: int = 0
    completed_executions: int = 0
    failed_executions: int = 0
    average_execution_time_ms: float = 0.0
    success_rate_percent: float = 0.0
    executions_by_function: dict[str, int] = {}


class GetStatsResponse(msgspec.Struct):
    """The parts of GetStats that were asked for."""

    service_stats: ServiceStats
    task_stats: TaskStats | None = None
    execution_stats: ExecutionStats | None = None
