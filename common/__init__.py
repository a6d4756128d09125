"""What every stage shares and no stage owns: durable file writes and hashing (``durable``), the
strict dataclass loader behind every config section (``strict``), the names of the files under a
run directory (``rundir``) and the one-writer lock (``locking``). It imports no other package of
this project, so any of them may use it."""
