#include <iostream>
int main() { std::cerr << "oops\n"; }
