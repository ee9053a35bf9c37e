"""A whole federation on one machine: phantom sites, scanner profiles, the runner."""
