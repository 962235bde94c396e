"""kinema.sim2real."""
