"""One thin module per DVC stage: read params, load inputs, call `pipeline`, write outputs atomically."""
