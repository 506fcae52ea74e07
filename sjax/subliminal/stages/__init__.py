"""The experiment's stages, one module each: a frozen `Reads` slice of the config, its
`reads(cfg)`, the stage body and `STAGE` (see `sjax.subliminal.workspace.Stage`)."""
