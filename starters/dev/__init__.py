"""The dev stack: `refunds dev` (embedded Temporal and PostgreSQL, a worker and the relay in
one process), the sandbox provider and the demo. Development installs only: the production
wheel leaves this folder out."""
