"""The runbooks of seeds 000-002 as commands: diagnose, show the plan, do it safely."""
