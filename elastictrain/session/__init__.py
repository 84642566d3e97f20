"""Worker sessions: the local channel between each worker and its node's agent."""
