"""What every stage shares and no stage owns: durable file writes and hashing (``durable``), the
strict dataclass loader behind every config section (``strict``), and the names of the files under a
run directory (``rundir``). It imports no other package of this project, so any of them may use it."""
