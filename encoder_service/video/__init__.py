"""Video: container decoding and frame sampling (`decode`), EVS token pruning (`evs`)."""
