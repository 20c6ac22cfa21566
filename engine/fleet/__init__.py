"""Remote workers started over SSH: hosts, the ssh runner, starting and stopping workers.

The system OpenSSH client does the talking (so ``~/.ssh/config`` aliases, agents, ProxyJump
and known_hosts work as the user set them up) rather than a Python SSH library: the fleet
needs to run a few short commands and start detached processes, which plain ``ssh`` does,
and one ControlMaster connection per host keeps repeated commands cheap.
"""
