"""Plan search: cost model, dynamic program, packing, exhaustive oracle."""
