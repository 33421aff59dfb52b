"""The operations of spear, written once for both adapters: invoke, status, cancel, lists, tasks,
health, stats; with admission control, completion waiters and the task directory."""
