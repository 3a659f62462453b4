import Control
print("epokd")
