"""Read-only measurements of a teacher and a student: similarity (CKA and friends) and predictions."""
