"""Preprocessing tier (CPU): images and chats in, prepared prompts out."""
