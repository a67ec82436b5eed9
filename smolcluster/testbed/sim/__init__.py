"""Simulation backends: local processes and docker-compose."""
