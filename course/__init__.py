"""Course tooling: the student release (`course.release`) and the autograder (`course.grade`).

The package's source is the homework's solution. The parts a student writes are marked with nbgrader's solution
delimiters (`### BEGIN SOLUTION` / `### END SOLUTION`); `course.tasks` maps each marked function to its task and
holds the one points table.
"""
