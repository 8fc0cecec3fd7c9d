"""Side services and operations: configuration, the state journal, metrics, systemd notify, the agent as a
child process."""
