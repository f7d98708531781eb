"""The agent's enrolment (one-time token, pinned CA) and certificate renewal."""
