"""In-memory snapshots held by the agent, erasure-coded across nodes, with a disk tier."""
