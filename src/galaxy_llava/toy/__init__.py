"""The offline demo's parts, apart from the product: GalSim galaxies in the GZ2 schema
(``synthetic``) with simulated volunteer votes (``votes``), tiny random-initialised models in the
Hugging Face layout (``tiny``) with a generic-scene pretraining stage (``pretrain``), and the
end-to-end ``demo``. The product modules never import these; tests, benchmarks and the CLI's
``synth`` / ``tiny-model`` / ``demo`` commands do."""
