"""`specmesh bench` internals: prompt sets (prompts), the five systems (systems, run one per process
by worker), figures and tables (report), and the chart (plot). The command is clients/bench_cmd.py."""
