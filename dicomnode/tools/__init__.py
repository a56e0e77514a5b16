"""Tools around the node, not part of the daemon: the phantom generator, `dicomnode demo`, offline
inference (`dicomnode infer`) and image metrics. `dicomnode serve` never imports this package."""
