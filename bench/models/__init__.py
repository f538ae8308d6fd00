"""Models the accuracy benches profile, written the way users write them (nothing shaped around autopar)."""
