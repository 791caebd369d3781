"""Stage 2's classifiers on cached features: the logistic-regression and Dense heads with one
estimator interface, their feature scaling, and saving them without pickle (`estimators`).

Importing this package loads nothing heavy: each module imports what it needs."""
