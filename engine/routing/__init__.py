"""Fields, filters, schedules, routing plans and the compiled runtime."""
