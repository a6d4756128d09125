"""The workflow that ties the stages together, its config and its single CLI (`pretrain`)."""
