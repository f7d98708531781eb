"""VDI client sessions: found in the process table (``clients``), their lifecycle as pure bookkeeping
(``book``), ended as process trees (``ending``), launched through the local gate (``gate``, ``localsock``), and
what the client connects to (``vdiargs``)."""
