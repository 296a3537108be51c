"""Explanation methods: each file one method with one public function taking ``net`` first."""
