"""Actions: the runner that carries out decided actions, and the drivers that act (the agent over MQTT on the
endpoint side; libvirt and site commands on the desktop side)."""
